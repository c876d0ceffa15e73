"""A/B of the MGD loss's reduction and mask, the four R50->R18 stages at 64 px, batch 16, forward + backward.

'old' is the implementation before 2026-12-03 (advanced indexing, a three-pass mask), 'new' the
current one (index_select + view, a two-pass mask; moco_mgd.losses.mgd), 'new-where' a variant with
torch.where. All three run interleaved in one process (min and median of 15 rounds), and the script
first checks that they give bitwise the same loss and gradients.

    OMP_NUM_THREADS=1 python benchmarks/ab_mgd_loss.py
"""
import torch, time
torch.manual_seed(0)
def old_reduce(t, groups):
    g = t[:, groups]; high, low = g.amax(2), g.amin(2); return torch.where(high >= -low, high, low)
def new_reduce(t, groups):
    b, _, h, w = t.shape; cs, a = groups.shape
    g = t.index_select(1, groups.reshape(-1)).view(b, cs, a, h, w); high, low = g.amax(2), g.amin(2); return torch.where(high >= -low, high, low)
def old_l2(s, t, m):
    t = torch.maximum(t, m.reshape(1, -1, 1, 1)); keep = (s > t) | (t > 0); return ((s - t).pow(2) * keep).sum()
def new_l2(s, t, m):
    t = torch.maximum(t, m.reshape(1, -1, 1, 1)); d = s - t; return torch.where(torch.maximum(d, t) > 0, d, 0.0).pow(2).sum()
def new2_l2(s, t, m):
    t = torch.maximum(t, m.reshape(1, -1, 1, 1)); d = s - t; keep = torch.maximum(d, t) > 0; return (d.pow(2) * keep).sum()
shapes = [(16, 64, 256, 16), (16, 128, 512, 8), (16, 256, 1024, 4), (16, 512, 2048, 2)]
data = []
for b, cs, ct, hw in shapes:
    t = torch.randn(b, ct, hw, hw); s = torch.randn(b, cs, hw, hw, requires_grad=True)
    groups = torch.randperm(ct).view(cs, ct // cs); m = -torch.rand(cs)
    data.append((s, t, groups, m))
def run(red, l2):
    total = 0
    for s, t, g, m in data:
        total = total + l2(s, red(t, g), m)
    total.backward()
    return total
for s, *_ in data: s.grad = None
a = run(old_reduce, old_l2); ga = [s.grad.clone() for s, *_ in data]
for s, *_ in data: s.grad = None
b = run(new_reduce, new_l2); gb = [s.grad.clone() for s, *_ in data]
print("loss bitwise", torch.equal(a, b), "grads bitwise", all(torch.equal(x, y) for x, y in zip(ga, gb)))
for s, *_ in data: s.grad = None
c = run(new_reduce, new2_l2); gc = [s.grad.clone() for s, *_ in data]
print("new2 loss bitwise", torch.equal(a, c), "grads bitwise", all(torch.equal(x, y) for x, y in zip(ga, gc)))
res = {"old": [], "new-where": [], "new": []}
for rep in range(15):
    for name, (r, l) in {"old": (old_reduce, old_l2), "new-where": (new_reduce, new_l2), "new": (new_reduce, new2_l2)}.items():
        for s, *_ in data: s.grad = None
        t0 = time.perf_counter(); run(r, l); res[name].append(time.perf_counter() - t0)
for k, v in res.items():
    print(k, "min ms %.2f median %.2f" % (min(v) * 1e3, sorted(v)[len(v) // 2] * 1e3))
