"""One optimizer step of the training loop: exact gradients under accumulation and DDP; weight decay groups."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipelines.train.loop import freeze_unused_pooler, param_groups
from pipelines.train.step import accumulate_gradients
from tests.conftest import ALL_KIND_HEADS, tiny_model

ROWS, TOKENS, IGNORE = 32, 7, -100
HEADS = [
    {**ALL_KIND_HEADS[0]},
    {**ALL_KIND_HEADS[1], "class_weights": [1.0, 2.0, 0.5]},
    {**ALL_KIND_HEADS[2], "loss_weight": 0.5},
    {**ALL_KIND_HEADS[3], "class_weights": [0.5, 1.0, 1.5, 2.0], "loss_weight": 2.0},
    {**ALL_KIND_HEADS[4]},
]


def model():
    """The tiny model with every head kind, in eval mode (no dropout), pooler frozen as in training."""
    m = tiny_model(heads=HEADS, seed=0)
    freeze_unused_pooler(m)
    return m


def data():
    """32 rows whose labels are spread very unevenly between the halves and quarters of the batch.

    trust: one label in rows 0-15, every row of 16-31; type: rows 0-15 only; tags: rows 10-15 unlabelled,
    single entries missing in 16-31; topic: group 0 in rows 0-15 and 20-23, group 1 in rows 30-31 only;
    sphere: rows 0-1 and 16-31.
    """
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (ROWS, TOKENS), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 4:] = 0
    trust = torch.randint(0, 2, (ROWS,), generator=g).float()
    trust[:16] = IGNORE
    trust[3] = 1.0
    kind = torch.randint(0, 3, (ROWS,), generator=g)
    kind[16:] = IGNORE
    tags = torch.randint(0, 2, (ROWS, 3), generator=g).float()
    tags[10:16] = IGNORE
    tags[16:, 1][::2] = IGNORE
    topic = torch.randint(0, 4, (ROWS, 2), generator=g)
    topic[16:20, 0] = IGNORE
    topic[24:, 0] = IGNORE
    topic[:30, 1] = IGNORE
    soft = torch.rand(ROWS, 3, generator=g)
    sphere = soft / soft.sum(-1, keepdim=True)
    sphere[2:16] = IGNORE
    return ids, mask, {"trust": trust, "type": kind, "tags": tags, "topic": topic, "sphere": sphere}


def rows(batch, start, stop):
    ids, mask, labels = batch
    return {"input_ids": ids[start:stop], "attention_mask": mask[start:stop],
            "labels": {name: y[start:stop] for name, y in labels.items()}}


def gradients(m):
    grads = {}
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            grads[name] = p.grad.detach().clone()
    m.zero_grad(set_to_none=True)
    return grads


def full_batch_gradients():
    """The reference: the model's own loss on all 32 rows, one backward pass."""
    m = model()
    ids, mask, labels = data()
    m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return gradients(m)


def relative_error(a, b):
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in b))
    return float(diff / torch.sqrt(sum((v ** 2).sum() for v in b.values())))


def assert_same(a, b):
    """Within 1e-5 relative, overall and per tensor (attention key biases have a zero gradient, up to 1e-12)."""
    assert a.keys() == b.keys()
    assert relative_error(a, b) < 1e-5
    for name in b:
        assert (a[name] - b[name]).norm() <= 1e-5 * b[name].norm() + 1e-9, name


def test_every_head_is_labelled_unevenly():
    _, _, labels = data()
    labelled = {"trust": labels["trust"] != IGNORE, "type": labels["type"] != IGNORE,
                "tags": (labels["tags"] != IGNORE).any(-1), "topic": (labels["topic"] != IGNORE).any(-1),
                "sphere": (labels["sphere"] >= 0).all(-1)}
    counts = {name: [int(m[q:q + 8].sum()) for q in range(0, ROWS, 8)] for name, m in labelled.items()}
    assert counts["trust"] == [1, 0, 8, 8] and counts["type"] == [8, 8, 0, 0] and counts["sphere"] == [2, 0, 8, 8]


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    reference = full_batch_gradients()
    batch = data()
    for size in (16, 8):
        m = model()
        accumulate_gradients(m, m, [rows(batch, s, s + size) for s in range(0, ROWS, size)])
        assert_same(gradients(m), reference)


def test_the_mean_of_micro_batch_means_would_not():
    m = model()
    batch = data()
    for start in (0, 16):  # the old loop: each micro-batch's mean loss, divided by the accumulation
        part = rows(batch, start, start + 16)
        (m(input_ids=part["input_ids"], attention_mask=part["attention_mask"], labels=part["labels"]).loss / 2).backward()
    assert relative_error(gradients(m), full_batch_gradients()) > 0.05


def test_a_head_without_labels_in_the_step_gets_zero_gradients():
    m = model()
    ids, mask, labels = data()
    labels["sphere"][:] = IGNORE
    accumulate_gradients(m, m, [rows((ids, mask, labels), s, s + 16) for s in (0, 16)])
    grads = gradients(m)
    sphere = [g for name, g in grads.items() if name.startswith("heads.h_sphere.")]
    assert sphere and all(torch.count_nonzero(g) == 0 for g in sphere)
    assert torch.count_nonzero(grads["heads.h_type.net.1.weight"]) > 0


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = model()
        ddp = DistributedDataParallel(m)
        batch = data()
        share = ROWS // world
        for size in (share, share // 2):  # one micro-batch per worker, then two (accumulation too)
            start = rank * share
            accumulate_gradients(m, ddp, [rows(batch, s, s + size) for s in range(start, start + share, size)], world=world)
            torch.save(gradients(m), f"{out_dir}/rank{rank}_{size}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_give_the_full_batch_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    reference = full_batch_gradients()
    for size in (16, 8):
        grads = [torch.load(tmp_path / f"rank{rank}_{size}.pt") for rank in (0, 1)]
        assert_same(grads[0], reference)
        for name in reference:
            assert torch.equal(grads[0][name], grads[1][name]), name


def test_no_weight_decay_on_biases_and_norm_weights():
    m = tiny_model()
    m.freeze_heads(["sphere"])
    decay, no_decay = param_groups(m, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    trainable = {name for name, p in m.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain
    assert not any(name.startswith("heads.h_sphere.") for name in trainable)
    assert {n for n in trainable if n.endswith(".bias") or "LayerNorm" in n} == plain
    assert "encoder.embeddings.word_embeddings.weight" in decayed
    assert "encoder.encoder.layer.0.attention.self.query.weight" in decayed and "heads.h_type.net.1.weight" in decayed
