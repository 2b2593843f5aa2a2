"""What the compiler does to, and reads from, the WGSL text TVM 0.27 generates. Pure text: no TVM.

TVM's ``webgpu`` code generator emits WGSL that is almost, but not always, valid, and the launch
ABI is only partly in the text. :func:`fix` repairs the known defects; :func:`interface` reads a
kernel's bindings, scalar arguments and workgroup size back, so the compiler can check them
against the host code's launch and the runtime can build explicit bind group layouts.
"""

from __future__ import annotations

import dataclasses
import re

#: Storage-buffer element types a kernel may use (f16 with the shader-f16 feature; WGSL has no
#: 8/16/64-bit integers in core, and bool cannot live in a storage buffer).
STORAGE_TYPES = ("f32", "i32", "u32", "f16")

_BINDING = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var<(storage|uniform)(?:,\s*(read|read_write))?>\s*"
                      r"(\w+)\s*:\s*([^;]+);")
_WORKGROUP = re.compile(r"@workgroup_size\((\d+),\s*(\d+),\s*(\d+)\)")
_ENTRY = re.compile(r"^fn\s+(\w+)\s*\(\s*\n\s*@builtin\(workgroup_id\)", re.M)
_STRUCT = re.compile(r"struct\s+(\w+)\s*\{([^}]*)\}")
_FIELD = re.compile(r"(\w+)\s*:\s*(\w+)")
# TVM prints float constants with std::scientific plus a suffix, so an infinity or NaN comes out
# as ``inff``/``nanf`` (``-inff``...), which WGSL has no literal for.
_NONFINITE = re.compile(r"(?<![\w.])(inf|nan)f\b")
# The grid guard TVM puts first in every kernel skips blocks strictly past the logical grid x, but
# the block numbered exactly x exists too once the runtime folds a wide grid into z with rounding
# up (TVM's web runtime does the same); it must return as well.
_GUARD = re.compile(r"(if \(blockIdx\.z \* gridDim\.x \+ blockIdx\.x) > (\w+\.\w+)\) \{ return; \}")

_NONFINITE_DECL = ("// handoff: WGSL has no literal for infinity or NaN, and a constant expression may not "
                   "evaluate to one;\n// these are read at run time instead.\n"
                   "var<private> handoff_inf_bits : u32 = 0x7f800000u;\n"
                   "var<private> handoff_nan_bits : u32 = 0x7fc00000u;\n\n")


class WgslError(ValueError):
    """The generated WGSL cannot run as it is (an unsupported type, an unexpected interface)."""


@dataclasses.dataclass
class Interface:
    """A kernel's launch interface, as its WGSL declares it."""

    entry: str
    storage: list[tuple[str, str]]  # (access "read" | "read_write", element type), by binding number
    pods: list[str]  # WGSL types of the scalar arguments, in uniform order (packGridDimX excluded)
    workgroup_size: tuple[int, int, int]


def fix(source: str) -> str:
    """``source`` with TVM's known WGSL defects repaired: non-finite float literals become reads of
    private variables holding their bits, and the grid guard also skips the block at the grid's end."""
    text, count = _NONFINITE.subn(lambda m: f"bitcast<f32>(handoff_{m.group(1)}_bits)", source)
    if count:
        text = _NONFINITE_DECL + text
    return _GUARD.sub(r"\1 >= \2) { return; }", text)


def interface(source: str) -> Interface:
    """Read the bindings, uniform fields and workgroup size of a single-kernel WGSL module."""
    entries = _ENTRY.findall(source)
    if len(entries) != 1:
        raise WgslError(f"expected one compute entry point, found {len(entries)}")
    storage: dict[int, tuple[str, str]] = {}
    uniform: list[tuple[int, str]] = []
    for number, space, access, _name, ty in _BINDING.findall(source):
        ty = ty.strip()
        if space == "storage":
            m = re.fullmatch(r"array<(\w+)>", ty)
            if not m:
                raise WgslError(f"storage binding {number} has type {ty}, expected array<T>")
            if m.group(1) not in STORAGE_TYPES:
                raise WgslError(f"storage binding {number} holds {m.group(1)}, which WGSL storage buffers cannot "
                                f"(supported: {', '.join(STORAGE_TYPES)})")
            storage[int(number)] = (access or "read", m.group(1))
        else:
            uniform.append((int(number), ty))
    if sorted(storage) != list(range(len(storage))):
        raise WgslError(f"storage bindings {sorted(storage)} are not numbered 0..{len(storage) - 1}")
    if len(uniform) != 1 or uniform[0][0] != len(storage):
        raise WgslError("expected one uniform binding, numbered after the storage bindings")
    structs = {name: _FIELD.findall(body) for name, body in _STRUCT.findall(source)}
    fields = structs.get(uniform[0][1])
    if not fields or fields[-1][1] != "u32":
        raise WgslError(f"uniform struct {uniform[0][1]} does not end with the u32 grid size")
    pods = [ty for _, ty in fields[:-1]]
    for ty in pods:
        if ty not in ("i32", "u32", "f32"):
            raise WgslError(f"scalar argument of type {ty}; supported: i32, u32, f32")
    wg = _WORKGROUP.search(source)
    if not wg:
        raise WgslError("no @workgroup_size")
    return Interface(entries[0], [storage[i] for i in range(len(storage))], pods,
                     (int(wg.group(1)), int(wg.group(2)), int(wg.group(3))))
