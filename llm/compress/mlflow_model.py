"""The chosen variant as an MLflow pyfunc model: MLflow's "models from code" file, logged by tracking with the
compress stage's chosen model (`llm.tracking`); MLflow runs it when the model is loaded, nothing imports it.

`mlflow.transformers` cannot carry the variants: an int8 variant holds torch.ao packed weights that only the
project's loader reads (`transformers` alone would build the model with its weights missing). So the model's
directory is the `model` artifact and `load_context` opens it with `llm.models.load.load_model`, which needs
llmray where the model is loaded. `predict` answers each prompt as a user turn with the decoding the eval
table measured (`llm.eval.generate_texts`: chat template, greedy, cut at the stop ids serve uses). The answer
length is the model config's `max_new_tokens`, logged as `compress.eval.max_new_tokens`
(`mlflow.pyfunc.load_model(uri, model_config={"max_new_tokens": n})` changes it): a params schema would need an
input example, and MLflow runs `predict` on that when logging, which for a real model means loading it on the
driver.
"""

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

from llm.eval import PromptPair, generate_texts
from llm.models.load import load_model

MAX_NEW_TOKENS = 64


class ChosenModel(PythonModel):
    """Prompts in, greedy answers out, from the model directory logged as the `model` artifact."""

    def load_context(self, context: Any) -> None:
        self.loaded = load_model(context.artifacts["model"])
        self.max_new_tokens = int((context.model_config or {}).get("max_new_tokens", MAX_NEW_TOKENS))

    # Type hints, not a signature: MLflow infers the model's signature from them and checks inputs against it.
    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        pairs = [PromptPair(messages=[{"role": "user", "content": p}], reference="") for p in model_input]
        return generate_texts(self.loaded.model, self.loaded.tokenizer, pairs, max_new_tokens=self.max_new_tokens)


mlflow.models.set_model(ChosenModel())
