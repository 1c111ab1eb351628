"""PyTorch Lightning trains with geomopt optimizers: ``configure_optimizers`` returns the optimizer (built from the
module, so the routing is a plain loop's) and its scheduler stepped per batch; a run resumed through Lightning's
checkpoint ends with the weights of the uninterrupted run, bit for bit."""
import pytest
import torch
from grow_models import VOCAB

import geomopt
from geomopt.data import load_corpus
from geomopt.integrations import make_optimizer

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

# Steps per epoch; the run is two epochs, resumed from the checkpoint after the last batch of the first. (Lightning
# resumes a plain DataLoader at the start of its epoch, so a checkpoint from inside an epoch, or one saved by
# on_train_epoch_end, would replay batches; that is Lightning's data loop, the same with torch.optim.AdamW.)
EPOCH, LENGTH = 6, 24


def batches():
    train, _ = load_corpus(max_bytes=100_000)
    rows = torch.stack([(train[i * LENGTH:(i + 1) * LENGTH] % VOCAB).long() for i in range(4 * EPOCH)])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows), batch_size=4, shuffle=False)


class LM(pl.LightningModule):
    def __init__(self, spec):
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=48, num_hidden_layers=2, vocab_size=VOCAB,
                                       max_position_embeddings=32)
        self.model = transformers.LlamaForCausalLM(cfg)
        self.spec = spec

    def training_step(self, batch, _):
        ids = batch[0]
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.model, self.spec, total_steps=2 * EPOCH)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(spec, root, resume=None):
    module = LM(spec)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=EPOCH, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2 * EPOCH, logger=False, callbacks=[ckpt],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=batches(), ckpt_path=resume)
    return module, trainer


SPECS = {"poet": "poet:lr=1e-2,block_size=8,merge_every=4", "relora": "relora:lr=1e-2,rank=4,alpha=8,reset_every=5",
         "dlra": "dlra:lr=3e-3,rank=4,method=adam"}


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on dataloader workers and the like
@pytest.mark.parametrize("name", SPECS)
def test_resume_through_lightning_ends_with_the_uninterrupted_weights(name, tmp_path):
    full, trainer = fit(SPECS[name], tmp_path / "full")
    opt = trainer.optimizers[0]
    assert type(opt) is type(make_optimizer(LM(SPECS[name]).model, SPECS[name], total_steps=1)[0])
    assert trainer.global_step == 2 * EPOCH and opt.routing().summary().startswith("routing: 14 tensors")
    assert opt.param_groups[0]["lr"] != opt.defaults["lr"]  # the scheduler stepped it
    resumed, again = fit(SPECS[name], tmp_path / "resumed", resume=str(tmp_path / "full" / f"step={EPOCH}.ckpt"))
    assert again.global_step == 2 * EPOCH
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), LM(SPECS[name]).parameters()))
    torch.testing.assert_close(again.optimizers[0].state_dict()["param_groups"][0]["lr"],
                               opt.state_dict()["param_groups"][0]["lr"], rtol=0, atol=0)


def test_poet_steps_the_routed_weights_under_lightning(tmp_path):
    full, trainer = fit(SPECS["poet"], tmp_path)
    opt = trainer.optimizers[0]
    assert isinstance(opt, geomopt.POET)
    routed = {r.name for r in opt.routing() if r.route == "POET"}
    assert "lm_head.weight" not in routed and "model.embed_tokens.weight" not in routed and len(routed) == 14
