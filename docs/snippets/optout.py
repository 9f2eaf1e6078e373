# Opting an expert out: a -inf logit before the softmax is the same as deleting
# the expert's router row.
import numpy as np
from tinygrad import Tensor
import olmoe

rng = np.random.default_rng(1)
N, D, E, k = 5, 8, 4, 2
h = Tensor(rng.normal(size=(N, D)).astype(np.float32))
W_r = rng.normal(size=(E, D)).astype(np.float32)
out = 2                                             # the expert that opts out

mask = Tensor([e != out for e in range(E)])         # (E,) False = excluded
_, g_mask, i_mask = olmoe.route(h, Tensor(W_r), k, expert_mask=mask)
kept = [e for e in range(E) if e != out]            # delete row 2, renumber the rest
_, g_del, i_del = olmoe.route(h, Tensor(W_r[kept]), k)
print("masked:  experts", i_mask.numpy().tolist())
print("deleted: experts", np.array(kept)[i_del.numpy()].tolist(), "(numbered back)")
print("max |g_masked - g_deleted| =", np.abs(g_mask.numpy() - g_del.numpy()).max())

# the wrong way: zeroing the expert's FFN leaves its router row, so it still
# takes top-k slots, and the weight it gets is lost
_, g_all, i_all = olmoe.route(h, Tensor(W_r), k)
takes = (i_all.numpy() == out).any(1)
left = np.where(i_all.numpy() == out, 0, g_all.numpy()).sum(1)[takes]
print(f"zeroed instead: expert {out} still takes a slot for {takes.sum()} of {N}",
      f"tokens; their remaining weight sums: {left.round(3)}")
