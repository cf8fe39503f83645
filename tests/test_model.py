import torch

from conftest import SMALL
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.models.item_llm import build_llama, count_parameters
from recsys_compress.models.lit_seqrec import SeqRecLitModule
from recsys_compress.models.config import OptimConfig


def tiny(n_items=50, **kw):
    torch.manual_seed(0)
    return SeqRecLitModule(build_llama(n_items, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                                       max_len=10, dropout=0.0), embedding_dropout=0.0, **kw)


def test_scores_every_item_and_ignores_left_padding():
    lit = tiny().eval()
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    scores = lit(ids, (ids != 0).long())
    assert scores.shape == (2, 51)
    alone = lit(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(scores[0], alone[0], atol=1e-5, rtol=1e-5)


def test_head_is_tied_and_parameters_counted_once():
    lit = tiny()
    model = lit.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    unique = {id(p): p for p in model.parameters()}
    assert count_parameters(model) == sum(p.numel() for p in unique.values())
    assert model.get_input_embeddings().weight.shape == (51, 16)


def test_backward_reaches_every_parameter_and_loss_falls_on_real_batches():
    dm = NextItemDataModule("grouplens_csv", SMALL, max_len=10, batch_size=32)
    dm.setup()
    torch.manual_seed(0)
    lit = SeqRecLitModule(build_llama(dm.n_items, hidden_size=16, num_layers=1, num_heads=2,
                                      intermediate_size=32, max_len=10, dropout=0.0), OptimConfig(lr=1e-2))
    batch = next(iter(dm.train_dataloader()))
    optimizer = torch.optim.Adam(lit.parameters(), lr=1e-2)
    lit.log = lambda *a, **k: None  # no trainer attached
    losses = []
    for step in range(15):
        loss = lit.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in lit.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert missing == []
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_loss_ignores_padding_positions():
    lit = tiny()
    lit.log = lambda *a, **k: None
    ids = torch.tensor([[0, 0, 0, 7, 8, 9]])
    padded = lit.training_step({"input_ids": ids, "attention_mask": (ids != 0).long()}, 0)
    short = torch.tensor([[7, 8, 9]])
    unpadded = lit.training_step({"input_ids": short, "attention_mask": torch.ones_like(short)}, 0)
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)
