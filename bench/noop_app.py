"""Serve's floor for the online benchmark: a FastAPI ingress on one deployment, default
settings, that reads the same POST body as ray-ensemble and answers a fixed prediction."""

from fastapi import FastAPI
from ray import serve

from pipelines.online import PredictRequest

noop = FastAPI()


@serve.deployment(name="noop")
@serve.ingress(noop)
class NoOp:
    @noop.post("/v1/predict")
    async def predict(self, payload: PredictRequest) -> dict:
        return {
            "predictions": [
                {"label": "positive", "score": 0.5, "probs": {"negative": 0.5, "positive": 0.5}}
                for _ in payload.inputs
            ]
        }


app = NoOp.bind()
