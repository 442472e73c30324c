"""Recipes from the README: transformers' Trainer with backend="ckpt", RNNs, and a bad
``options=`` caught as ckptfx.ConfigError."""

from __future__ import annotations

import pytest
import torch

import ckptfx
from ckptfx.capture import capture_joints



def test_bad_options_under_backend_ckpt_are_a_config_error_at_the_first_call():
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="ckpt",
                             options={"memory_budget": "lots"})
    with pytest.raises(ckptfx.ConfigError, match="memory_budget='lots'"):
        compiled(torch.randn(2, 4)).sum().backward()
    torch._dynamo.reset()


class _Ids(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seq: int = 16, vocab: int = 128) -> None:
        torch.manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, seq))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(tmp_path, options):
    """Two Trainer steps of a one-layer LLaMA; ``options`` None trains eagerly."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if options is not None:
        torch._dynamo.reset()
        model.compile(backend="ckpt", options=options)  # in place: forward's signature stays
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Ids())
    result = trainer.train()
    torch._dynamo.reset()
    return result.training_loss, [p.detach().clone() for p in model.parameters()]


def test_trainer_two_steps_with_a_ckpt_budget_match_eager(tmp_path):
    eager_loss, eager_params = _train(tmp_path / "eager", None)
    loss, params = _train(tmp_path / "ckpt", {"memory_budget": 0.5, "inner": "eager"})
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_model_dynamo_runs_eagerly_gets_a_message_naming_allow_rnn():
    # nn.LSTM runs eagerly under Dynamo unless allow_rnn is set (and on torch 2.13 CPU,
    # AOTAutograd then fails on the fused kernel's undefined workspace, with aot_eager too).
    torch.manual_seed(0)
    lstm, x = torch.nn.LSTM(8, 8, batch_first=True), torch.randn(2, 4, 8)
    with pytest.raises(ckptfx.UnsupportedGraphError, match="allow_rnn"):
        capture_joints(lstm, (x,), loss=lambda out: out[0].sum())


class _TwoIn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, scale=None):
        y = self.lin(x).tanh()
        return y if scale is None else y * scale


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_testing_train_takes_a_tensor_a_tuple_or_a_dict(form):
    from ckptfx import testing

    torch.manual_seed(0)
    model, x, scale = _TwoIn(), torch.randn(3, 4), torch.randn(3, 4)
    inputs = {"tensor": x, "tuple": (x, scale), "dict": {"x": x, "scale": scale}}[form]
    torch._dynamo.reset()
    got = testing.train(model, ckptfx.CkptBackend(inner="eager"), inputs, steps=2)
    ref = testing.train(model, None, inputs, steps=2)
    torch._dynamo.reset()
    testing.assert_same_run(got, ref)
    assert len(got) == 2 and all(p is not None for p in got[0].grads)
