"""Calibration replay. A calibrated stage runs each decoder block several times over the same windows (once per
group of linears whose input statistics it needs, then for the block's outputs), and most of each pass recomputes
what the pass before it computed: the linears whose weights have not changed since, and the attention of unchanged
q/k/v. The block walk installs these two replays, which hand such results back instead of computing them again.
Inputs are compared element by element and weights against a snapshot, so every result handed back is bit for bit
the one the computation would give; what does not fit a memory budget is computed as before.
"""

import torch

ATTENTION_BUDGET = 512 << 20  # bytes each replay may keep alive for one block
LINEAR_BUDGET = 1 << 30


class ReplayStore:
    """Results kept under a fingerprint (the module, the inputs' shapes and sums), each with the inputs it was
    computed from, within a byte budget (inputs held by several results count once)."""

    def __init__(self, budget_bytes: int):
        self._budget = budget_bytes
        self.hits = 0  # over the store's life, for tests and reports
        self.reset()

    def reset(self) -> None:
        self._records: dict[tuple, list] = {}
        self._held: dict[int, list[int]] = {}  # data_ptr -> [bytes, results holding it]
        self._bytes = 0

    @staticmethod
    def fingerprint(module, tensors: tuple[torch.Tensor, ...]) -> tuple:
        return (module, *(t.shape for t in tensors), *(float(t.sum()) for t in tensors))

    def find(self, key: tuple, tensors: tuple[torch.Tensor, ...], same: tuple = ()):
        """The result kept for inputs equal to `tensors` (and `same`, compared by identity), or None. A result
        changed in place since it was kept is not handed back."""
        for kept, kept_same, out, versions in self._records.get(key, []):
            if (
                all(a is b for a, b in zip(kept_same, same, strict=True))
                and [t._version for t in _tensors(out)] == versions
                and all(torch.equal(a, b) for a, b in zip(kept, tensors, strict=True))
            ):
                self.hits += 1
                return out
        return None

    def keep(self, key: tuple, tensors: tuple[torch.Tensor, ...], same: tuple, out) -> None:
        size = sum(t.nbytes for t in _tensors(out))
        size += sum(t.untyped_storage().nbytes() for t in tensors if t.data_ptr() not in self._held)
        if not self.reserve(size):
            return
        for t in tensors:
            held = self._held.setdefault(t.data_ptr(), [t.untyped_storage().nbytes(), 0])
            held[1] += 1
        self._records.setdefault(key, []).append((tensors, same, out, [t._version for t in _tensors(out)]))

    def reserve(self, size: int) -> bool:
        """Count `size` more bytes against the budget, if they fit."""
        if self._bytes + size > self._budget:
            return False
        self._bytes += size
        return True

    def release(self, size: int) -> None:
        self._bytes -= size

    def drop(self, module) -> None:
        """Forget every result of `module` (its weights changed)."""
        for key in [k for k in self._records if k[0] is module]:
            for tensors, _, out, _ in self._records.pop(key):
                self._bytes -= sum(t.nbytes for t in _tensors(out))
                for t in tensors:
                    held = self._held[t.data_ptr()]
                    held[1] -= 1
                    if held[1] == 0:
                        self._bytes -= held[0]
                        del self._held[t.data_ptr()]


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


class AttentionReplay:
    """The attention function a block walk registers: the model's own implementation, with results handed back
    when a later pass calls it with equal query, key and value and the same mask."""

    NAME = "sparamx_calibration_replay"

    def __init__(self, inner: str):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._inner = ALL_ATTENTION_FUNCTIONS[inner]
        self.store = ReplayStore(ATTENTION_BUDGET)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        tensors = (query, key, value)
        fingerprint = ReplayStore.fingerprint(module, tensors)
        out = self.store.find(fingerprint, tensors, (attention_mask,))
        if out is None:
            out = self._inner(module, query, key, value, attention_mask, **kwargs)
            self.store.keep(fingerprint, tensors, (attention_mask,), out)
        return out


class LinearReplay:
    """`with LinearReplay(linears):` each torch.nn.Linear hands back the output of an equal input, as long as its
    weight and bias equal the ones that output was computed with. A snapshot of them is kept to compare (weights
    changed through `.data` do not count a new version), within the budget too: a linear without one runs as is."""

    def __init__(self, linears):
        self._linears = list(linears)
        self._snapshots: dict[torch.nn.Module, tuple] = {}
        self.store = ReplayStore(LINEAR_BUDGET)

    def __enter__(self):
        for linear in self._linears:
            linear.forward = lambda x, linear=linear: self._forward(linear, x)
        return self

    def __exit__(self, *exc):
        for linear in self._linears:
            del linear.forward  # the class's own forward again
        self._snapshots.clear()
        self.store.reset()

    def _forward(self, linear, x: torch.Tensor) -> torch.Tensor:
        params = (linear.weight,) if linear.bias is None else (linear.weight, linear.bias)
        snapshot = self._snapshots.get(linear)
        if snapshot is None or not all(torch.equal(a, b) for a, b in zip(snapshot, params, strict=True)):
            self.store.drop(linear)
            if snapshot is not None:
                self.store.release(sum(p.nbytes for p in snapshot))
                del self._snapshots[linear]
            if not self.store.reserve(sum(p.nbytes for p in params)):
                return torch.nn.functional.linear(x, linear.weight, linear.bias)
            self._snapshots[linear] = tuple(p.detach().clone() for p in params)
        key = ReplayStore.fingerprint(linear, (x,))
        out = self.store.find(key, (x,))
        if out is None:
            out = torch.nn.functional.linear(x, linear.weight, linear.bias)
            self.store.keep(key, (x,), (), out)
        return out
