"""The HuggingFace Trainer trains with geomopt optimizers, both ways of passing them, and a run resumed from
a checkpoint (optimizer.pt loaded with weights_only=True) ends with the weights of the uninterrupted run."""
import re

import pytest
import torch
from grow_models import VOCAB

import geomopt
from geomopt.data import load_corpus
from geomopt.integrations import make_optimizer, parse_spec
from geomopt.registry import REGISTRY
from geomopt.schedules import jagged_cosine

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

STEPS, SAVE = 12, 6


class Windows(torch.utils.data.Dataset):
    def __init__(self, n=64, length=24):
        train, _ = load_corpus(max_bytes=100_000)
        self.rows = [(train[i * length:(i + 1) * length] % VOCAB).long() for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                      num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def args(out, **kw):
    base = dict(max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=4, use_cpu=True, report_to=[],
                logging_steps=100, seed=0, data_seed=0, save_only_model=False, disable_tqdm=True,
                dataloader_num_workers=0)
    return TrainingArguments(output_dir=str(out), **{**base, **kw})


def pair(name):
    """(optimizer, scheduler) for ``model``, built the way a user would for ``Trainer(optimizers=...)``."""
    def build(m):
        if name == "poet":
            opt = geomopt.POET(m, lr=1e-2, block_size=8, merge_every=4)  # merges inside each half
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * STEPS))
        if name == "relora":
            opt = geomopt.ReLoRAReset(m, lr=1e-2, rank=4, alpha=8, reset_every=5, restart_warmup_steps=0)
            fn = jagged_cosine(total_steps=STEPS, warmup_steps=2, restart_every=5, restart_warmup_steps=2)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return make_optimizer(m, "dlra:lr=3e-3,rank=4,method=adam", total_steps=STEPS)
    return build


def train(tmp, build, resume=None):
    m = model()
    trainer = Trainer(model=m, args=args(tmp), train_dataset=Windows(), optimizers=build(m))
    trainer.train(resume_from_checkpoint=resume)
    return m, trainer


@pytest.mark.parametrize("name", ["poet", "relora", "dlra"])
def test_resume_from_checkpoint_ends_with_the_uninterrupted_weights(name, tmp_path):
    full, trainer = train(tmp_path / "full", pair(name))
    assert trainer.state.global_step == STEPS
    loss = [e["train_loss"] for e in trainer.state.log_history if "train_loss" in e]
    assert loss and loss[0] < 5.0  # it trained (log(64) = 4.16 at chance)
    resumed, _ = train(tmp_path / "resumed", pair(name), resume=str(tmp_path / "full" / f"checkpoint-{SAVE}"))
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    before = model()
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), before.parameters()))


def test_optimizer_cls_and_kwargs_with_the_model_routes_like_a_plain_loop(tmp_path):
    m = model()
    trainer = Trainer(model=m, args=args(tmp_path, save_strategy="no"), train_dataset=Windows(),
                      optimizer_cls_and_kwargs=(geomopt.POET, {"model": m, "lr": 1e-2, "block_size": 8}))
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, geomopt.POET)
    factorized = [p for g in opt.param_groups if g["factorize"] for p in g["params"]]
    assert len(factorized) == 14  # q, k, v, o, gate, up, down in two layers; embeddings and head on AdamW
    assert all(p is not m.lm_head.weight and p is not m.model.embed_tokens.weight for p in factorized)


def test_optimizer_cls_and_kwargs_without_the_model_warns_that_everything_2d_is_factorized(tmp_path):
    m = model()
    trainer = Trainer(model=m, args=args(tmp_path, save_strategy="no", max_steps=2), train_dataset=Windows(),
                      optimizer_cls_and_kwargs=(geomopt.POET, {"lr": 1e-2, "block_size": 8}))
    with pytest.warns(UserWarning, match="without names, so all of them are factorized"):
        trainer.train()


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_make_optimizer_specs_and_errors():
    m = model()
    opt, sched = make_optimizer(m, "relora:lr=1e-3,rank=4,reset_every=20", total_steps=100)
    assert isinstance(opt, geomopt.ReLoRAReset) and opt.param_groups[0]["restart_warmup_steps"] == 0
    lrs = []
    for _ in range(45):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert lrs[20] == 0.0 and lrs[40] == 0.0 and 0 < lrs[21] < lrs[23]  # jagged at the resets, warm-up of 2
    assert parse_spec("poet: lr=3e-3, block_size=32, store_base=false, inner_kwargs=none") == (
        "poet", {"lr": 3e-3, "block_size": 32, "store_base": False, "inner_kwargs": None})
    assert parse_spec("poet:include=.*_proj,exclude=2") == ("poet", {"include": ".*_proj", "exclude": "2"})
    with pytest.raises(ValueError, match=re.escape(f"must be one of {', '.join(REGISTRY)}, got 'sgd'")):
        make_optimizer(m, "sgd:lr=1", total_steps=10)
    with pytest.raises(ValueError, match="expected key=value, got 'lr'"):
        parse_spec("poet:lr")
    with pytest.raises(TypeError, match="spec 'poet:rnak=4'.*rnak"):
        make_optimizer(m, "poet:rnak=4", total_steps=10)
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        make_optimizer(m, "poet", total_steps=0)
