"""deploy/: the KubeRay manifests agree with the image, the CLI and `serve-config`.

No Kubernetes and no Ray here: the manifests are read as YAML and checked against the
project's own parser, config loader and `ray-ensemble serve-config`.
"""

from __future__ import annotations

import re
import shlex
import shutil
from importlib.metadata import requires
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GPU = "nvidia.com/gpu"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load("rayjob.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _load("rayservice.yaml")


@pytest.fixture(scope="module")
def manifests(rayjob, rayservice) -> dict[str, dict]:
    return {"rayjob.yaml": rayjob, "rayservice.yaml": rayservice}


def _cluster(doc: dict) -> dict:
    """The RayCluster spec inside a RayJob (rayClusterSpec) or a RayService (rayClusterConfig)."""
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return doc["spec"][key]


def _groups(doc: dict) -> list[dict]:
    cluster = _cluster(doc)
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _limit(container: dict, key: str) -> int:
    resources = container.get("resources", {})
    return max(int(resources.get(kind, {}).get(key, 0)) for kind in ("limits", "requests"))


def _dockerfile() -> str:
    """deploy/Dockerfile without its comment lines."""
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _entrypoint_args(rayjob: dict) -> list[str]:
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.score"], words
    return words[3:]


def _parse_score(args: list[str]):
    from jobs.cli import build_parser

    try:
        return build_parser().parse_args(["score", *args])
    except SystemExit as exc:  # argparse's way of saying no
        pytest.fail(f"`ray-ensemble score` refuses the RayJob's arguments {args}: exit {exc.code}")


# -- both manifests ---------------------------------------------------------------------------


def test_manifests_are_kuberay_v1(rayjob, rayservice):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    for doc in (rayjob, rayservice):
        assert _cluster(doc)["enableInTreeAutoscaling"] is True


def test_head_advertises_no_gpu(manifests):
    for name, doc in manifests.items():
        head = _cluster(doc)["headGroupSpec"]
        assert str(head["rayStartParams"].get("num-gpus")) == "0", name
        assert all(_limit(c, GPU) == 0 for c in _containers(head)), name


def test_gpu_worker_group_with_sane_replicas(manifests):
    for name, doc in manifests.items():
        workers = _cluster(doc)["workerGroupSpecs"]
        gpu_groups = [g for g in workers if any(_limit(c, GPU) >= 1 for c in _containers(g))]
        assert gpu_groups, f"{name}: no worker group with a {GPU} limit"
        for g in gpu_groups:
            # Kubernetes schedules GPUs by the limit; a request alone is not enough.
            assert any(int(c["resources"]["limits"].get(GPU, 0)) >= 1 for c in _containers(g))
        for g in workers:
            assert 0 <= g["minReplicas"] <= g["maxReplicas"], (name, g["groupName"])
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]


def test_one_image_built_from_the_dockerfile(manifests):
    match = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu\s*$", _dockerfile(), re.M)
    assert match, "deploy/Dockerfile should start FROM rayproject/ray:<version>-py311-gpu"
    ray_version = match.group(1)
    images = set()
    for name, doc in manifests.items():
        assert str(_cluster(doc)["rayVersion"]) == ray_version, name
        images |= {c["image"] for g in _groups(doc) for c in _containers(g)}
    assert len(images) == 1, f"head and workers must run the same image: {images}"
    # The image's check that installing the project kept the base image's Ray.
    assert f"ray.__version__ != '{ray_version}'" in _dockerfile()
    # ... and that Ray satisfies the project's own requirement.
    from packaging.requirements import Requirement

    ray_req = next(r for r in map(Requirement, requires("ray-ensemble")) if r.name == "ray")
    assert ray_req.specifier.contains(ray_version), (ray_req, ray_version)


def test_dockerfile_installs_torch_then_the_project_at_the_working_dir(manifests):
    text = _dockerfile()
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)
    assert re.search(rf"^COPY\s+(--chown=\S+\s+)?\.\s+{re.escape(workdir)}/?\s*$", text, re.M)
    torch_pin = re.search(r"pip install[^\n]*\btorch==(2\.\d+\.\d+)\b", text)
    project = re.search(r"pip install[^\n]*\s-e\s+\.", text)
    assert torch_pin and project and torch_pin.start() < project.start()
    # The same torch as the cluster launcher's nodes.
    cluster = (ROOT / "cluster.yaml").read_text()
    assert re.search(rf"pip install torch=={re.escape(torch_pin.group(1))}\b", cluster)
    # Relative paths in the entrypoint and in serveConfigV2 are read from there.
    for name, doc in manifests.items():
        for g in _groups(doc):
            for c in _containers(g):
                assert c.get("workingDir", workdir) == workdir, (name, c["name"])


# -- RayJob -----------------------------------------------------------------------------------


def test_rayjob_runs_score_with_arguments_the_cli_accepts(rayjob):
    args = _parse_score(_entrypoint_args(rayjob))
    assert args.command == "score"
    assert (ROOT / args.config).is_file(), f"{args.config} is not a file in the repository"
    assert not args.address  # inside a Ray Job, jobs.score joins the job's own cluster
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "runtimeEnvYAML" not in spec  # the project is in the image


def test_rayjob_input_and_output_are_on_a_volume_every_pod_mounts(rayjob):
    args = _parse_score(_entrypoint_args(rayjob))
    pvcs = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((DEPLOY / "pvc.yaml").read_text())
        if d["kind"] == "PersistentVolumeClaim"
    }
    shared: set[tuple[str, str]] | None = None  # (mountPath, claim) in every container
    for g in _groups(rayjob):
        pod = g["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        for c in _containers(g):
            mounts = {
                (m["mountPath"], claims[m["name"]])
                for m in c.get("volumeMounts", [])
                if m["name"] in claims
            }
            shared = mounts if shared is None else shared & mounts
    assert shared, "no PersistentVolumeClaim mounted in the RayJob's pods"
    for path in (args.input, args.output):
        on = [claim for mount, claim in shared if PurePosixPath(path).is_relative_to(mount)]
        assert on, f"{path} is not on a volume that the head and every worker mount"
        claim = pvcs.get(on[0])
        assert claim, f"claim {on[0]} is not in deploy/pvc.yaml"
        assert "ReadWriteMany" in claim["spec"]["accessModes"]


# -- the example config, in a copy of the project -------------------------------------------


def _copy_config(config: str, root: Path) -> Path:
    """Copy ``config`` (relative to the repository) under ``root``, with empty stand-ins for
    the local paths it names: ``load_config`` checks that model and tokenizer directories
    exist (the example's are built into the gitignored examples/), not what is in them."""
    dest = root / config
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / config, dest)
    raw = yaml.safe_load(dest.read_text())
    for member in raw["members"]:
        for path in (
            member.get("model"),
            member.get("tokenizer"),
            (member.get("train") or {}).get("base_model"),
        ):
            if path and not Path(path).is_absolute():
                (dest.parent / path).resolve().mkdir(parents=True, exist_ok=True)
    stacking = (raw.get("reducer") or {}).get("stacking")
    if stacking:
        (dest.parent / stacking).resolve().parent.mkdir(parents=True, exist_ok=True)
        (dest.parent / stacking).resolve().touch()
    return dest


def test_rayjob_config_loads(rayjob, tmp_path):
    from pipelines.config import load_config

    config = _parse_score(_entrypoint_args(rayjob)).config
    cfg = load_config(_copy_config(config, tmp_path))
    assert cfg.members


def _serve_config(config: str, host: str, root: Path, monkeypatch, capsys) -> dict:
    from jobs.cli import main

    monkeypatch.chdir(root)  # serve-config writes the config path relative to the cwd
    capsys.readouterr()
    rc = main(["serve-config", config, "--host", host])
    out = capsys.readouterr().out
    assert rc == 0, out
    return yaml.safe_load(out)


def test_rayservice_serves_what_serve_config_prints(rayservice, tmp_path, monkeypatch, capsys):
    import ray

    ray_was_up = ray.is_initialized()  # True only if an earlier test started it
    ours = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    apps = ours["applications"]
    assert [a["import_path"] for a in apps] == ["pipelines.online:app_builder"]
    config = apps[0]["args"]["config"]
    assert (ROOT / config).is_file(), f"{config} is not a file in the repository"
    _copy_config(config, tmp_path)
    printed = _serve_config(config, "0.0.0.0", tmp_path, monkeypatch, capsys)
    assert apps == printed["applications"], (
        "serveConfigV2 is stale: paste in the output of "
        f"`ray-ensemble serve-config {config} --host 0.0.0.0`"
    )
    assert ours.get("proxy_location") == printed["proxy_location"]
    # The proxy must listen beyond localhost for the serve Service; the timeout follows the
    # config's serve.request_timeout_s.
    assert ours["http_options"] == printed["http_options"]
    assert ray.is_initialized() == ray_was_up  # serve-config needs no Ray


def test_rayservice_exposes_the_serve_port(rayservice):
    port = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["http_options"]["port"]
    head = _cluster(rayservice)["headGroupSpec"]
    ports = {p.get("name"): p["containerPort"] for c in _containers(head) for p in c["ports"]}
    assert ports.get("serve") == port  # KubeRay's <name>-serve-svc targets this port


# -- who can reach the cluster ----------------------------------------------------------------

GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}  # the KubeRay Helm chart's pod label


@pytest.fixture(scope="module")
def policies() -> list[dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "networkpolicy.yaml").read_text()) if d]
    assert all(
        (d["apiVersion"], d["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy") for d in docs
    )
    return docs


def _pod_labels(group: dict) -> dict:
    return (group["template"].get("metadata") or {}).get("labels") or {}


def _selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels are checked here"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _serve_port(doc: dict) -> int | None:
    if doc["kind"] != "RayService":
        return None
    return int(yaml.safe_load(doc["spec"]["serveConfigV2"])["http_options"]["port"])


def test_ray_token_authentication_is_on(manifests):
    """Ray's token authentication (RAY_AUTH_MODE=token, Ray >= 2.52) through KubeRay's
    authOptions: KubeRay makes the token's Secret and sets it in every Ray container."""
    from packaging.version import Version

    for name, doc in manifests.items():
        cluster = _cluster(doc)
        assert cluster.get("authOptions", {}).get("mode") == "token", name
        assert Version(str(cluster["rayVersion"])) >= Version("2.52.0"), name
        for g in _groups(doc):
            for c in _containers(g):
                env = {e["name"]: e for e in c.get("env", [])}
                # Nothing turns it off again, and no token sits in the manifest itself.
                assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token", name
                assert "value" not in env.get("RAY_AUTH_TOKEN", {}), name


def test_network_policy_lets_only_the_serve_port_in_from_outside_the_ray_pods(manifests, policies):
    for name, doc in manifests.items():
        groups = _groups(doc)
        pods = [_pod_labels(g) for g in groups]
        chosen = [
            p for p in policies if all(_selects(p["spec"]["podSelector"], pod) for pod in pods)
        ]
        assert len(chosen) == 1, f"{name}: one NetworkPolicy must select its head and workers"
        spec = chosen[0]["spec"]
        assert spec["podSelector"].get("matchLabels"), f"{name}: the policy selects every pod"
        assert "Ingress" in spec["policyTypes"]
        others = [m for m in manifests.values() if m is not doc]
        assert not any(
            _selects(spec["podSelector"], _pod_labels(g)) for m in others for g in _groups(m)
        ), f"{name}: its policy also selects the other manifest's pods"

        named = {
            p["name"]: p["containerPort"]
            for g in groups
            for c in _containers(g)
            for p in c.get("ports", [])
        }
        serve = _serve_port(doc)
        to_anyone: set[int] = set()
        to_named: dict[int, list[dict]] = {}
        among_ray_pods = False
        for rule in spec.get("ingress", []):
            ports = {int(named.get(p["port"], p["port"])) for p in rule.get("ports", [])}
            peers = rule.get("from") or []
            if not peers:  # from anywhere, outside the cluster included
                assert ports, f"{name}: a rule lets anyone in on every port"
                to_anyone |= ports
            elif all(peer == {"podSelector": spec["podSelector"]} for peer in peers):
                among_ray_pods |= not ports  # Ray talks on random ports between its pods
            else:
                assert ports, f"{name}: a rule lets pods that are not Ray's in on every port"
                for port in ports:
                    to_named.setdefault(port, []).extend(peers)
        assert among_ray_pods, f"{name}: the Ray pods must reach each other on every port"
        assert to_anyone == ({serve} if serve else set()), (name, to_anyone)
        for port in (GCS_PORT, CLIENT_PORT, named.get("gcs-server"), named.get("client")):
            assert port not in to_anyone and port not in to_named, (name, port)
        assert set(to_named) <= {DASHBOARD_PORT}, (name, to_named)
        # The KubeRay operator follows the job / the Serve app on the dashboard port.
        operator = [
            p for p in to_named.get(DASHBOARD_PORT, []) if _selects(p["podSelector"], OPERATOR)
        ]
        assert operator and all(p.get("namespaceSelector") == {} for p in operator), name
        if doc["kind"] == "RayJob":  # and the job's submitter pod submits there
            submitter = {
                "ray.io/originated-from-crd": "RayJob",
                "ray.io/originated-from-cr-name": doc["metadata"]["name"],
            }
            assert any(
                p == {"podSelector": {"matchLabels": submitter}} for p in to_named[DASHBOARD_PORT]
            ), name
