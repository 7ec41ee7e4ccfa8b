"""The one report type every converter returns with ``return_report=True``.

It lives at the bottom of the package so that the layers' own class methods
(``SparseHetConv2d.from_conv``) can return it too; :mod:`sparse_hetconv.convert` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConversionReport"]


@dataclass
class ConversionReport:
    """What a converter did: layers replaced and skipped, parameters, exactness, permutations.

    Attributes:
        converter (str): ``"to_sparse"``, ``"to_masked"``, ``"hetconvify"``, ``"from_conv"``,
            ``"from_shifted"``, ``"to_shifted"``, ``"to_submanifold"``, ...
        replaced (list of str): paths of the modules replaced, in module order; a module that sits
            at several paths (shared) is listed once, at its first path.
        skipped (dict): path -> why a candidate was left alone.
        params_before (int), params_after (int): stored parameter elements of the model before
            and after (shared parameters once).
        part (int or None), form (str or None): the converter's settings, where it has them.
        dropped (dict): path -> ``(largest dropped |weight|, relative output change)`` for every
            replaced layer whose result is *not* exact: a converter that reduces k x k kernels to
            1 x 1 ones (``hetconvify``, ``from_conv``, ``from_shifted(approximate=True)``) drops
            their non-centre taps. The relative change is ``||new(x) - old(x)|| / ||old(x)||``
            (Frobenius norms) on the layer's own random probe, computed in float64. Layers that
            convert exactly are not listed.
        permutations (list of str): paths of the :class:`~sparse_hetconv.ChannelPermutation`
            modules the converter left in the model (where a channel permutation could not be
            absorbed by a neighbouring layer); empty when none runs at inference.
        shared (dict): first path -> the other paths of a converted module that sits at several
            paths (weight tying, a block reused twice); it was converted once and stays shared.
        hooks (list of str): paths of replaced modules whose forward / backward hooks were moved
            onto the replacement.
        probed (list of str): paths of the replaced modules read by probing (``to_sparse``'s
            ``probe``); the others were read by their layout.
    """

    converter: str
    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    part: int | None = None
    form: str | None = None
    dropped: dict[str, tuple[float, float]] = field(default_factory=dict)
    permutations: list[str] = field(default_factory=list)
    shared: dict[str, list[str]] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)
    probed: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        """Parameters after / before (1.0 when nothing changed)."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def exact(self) -> bool:
        """True when no replaced layer dropped a non-zero weight: the model computes what it did."""
        return not self.dropped

    @property
    def max_dropped_weight(self) -> float:
        """The largest ``|weight|`` any replaced layer dropped (0.0 when exact)."""
        return max((d for d, _ in self.dropped.values()), default=0.0)

    @property
    def relative_change(self) -> float:
        """The largest per-layer relative output change on the probes (0.0 when exact)."""
        return max((r for _, r in self.dropped.values()), default=0.0)

    def __str__(self) -> str:
        settings = ""
        if self.part is not None or self.form is not None:
            settings = f"(part={self.part}, form={self.form!r})"
        probed = f" ({len(self.probed)} by probing)" if self.probed else ""
        lines = [f"{self.converter}{settings}: replaced {len(self.replaced)} layers{probed}, "
                 f"skipped {len(self.skipped)}; "
                 f"parameters {self.params_before:,} -> {self.params_after:,} ({self.reduction:.1%})"]
        if self.exact:
            lines.append("  exact: no weight was dropped")
        else:
            lines.append(f"  NOT exact: {len(self.dropped)} layers dropped weights (largest |w| "
                         f"{self.max_dropped_weight:.3g}, relative output change up to {self.relative_change:.3g})")
        lines += [f"  replaced {name or '<root>'}" + self._detail(name) for name in self.replaced]
        lines += [f"  skipped  {name or '<root>'}: {why}" for name, why in self.skipped.items()]
        if self.permutations:
            lines.append("  channel permutations left at: " + ", ".join(self.permutations))
        return "\n".join(lines)

    def _detail(self, name: str) -> str:
        text = " (probed)" if name in self.probed else ""
        if name in self.dropped:
            dropped, change = self.dropped[name]
            text += f" (dropped |w| <= {dropped:.3g}, relative change {change:.3g})"
        if name in self.shared:
            text += " (shared, also at " + ", ".join(self.shared[name]) + ")"
        return text
