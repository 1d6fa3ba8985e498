"""tfacd's C++ kernels for the quantizer's forward and backward passes, compiled on first use.

`fake_quant.cc` holds two TensorFlow CPU ops, `TfacdFakeQuantForward` and
`TfacdFakeQuantBackward`, that do the arithmetic of `tfacd.ops` (the formulas are in that
module's docstring) in one vectorized sweep per pass on every core of TensorFlow's intra-op
pool. They replace two XLA-compiled functions whose CPU loop fusions run on one thread (TF
profiler): on a 128x32x32x96 tensor, forward + backward with the SQNR powers takes about a
third of the XLA time (`benchmarks/quantizer_ops.py` prints both).

The ops are compiled against the installed TensorFlow the first time they are needed (6 s here,
with the system's `g++` and `tf.sysconfig`'s flags) and cached under
`$TFACD_KERNEL_CACHE` (default `~/.cache/tfacd/kernels`), keyed by the source, the
TensorFlow version and the CPU's features, since the build targets the CPU it runs on.
Without a compiler, or with `TFACD_KERNELS=xla`, tfacd uses the XLA functions and says so
once: the same math, slower. So does a quantizer inside a function that XLA compiles
(`jit_compile=True`; `tfacd.ops` checks), since XLA cannot run these ops.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings

import tensorflow as tf

SOURCE = pathlib.Path(__file__).with_name("fake_quant.cc")
BACKENDS = ("auto", "cpp", "xla")

_library = None
_failure: str | None = None
_forced: str | None = None


def backend_setting() -> str:
    """`TFACD_KERNELS`: `auto` (C++ if it builds, else XLA; the default), `cpp` (C++ or an
    error) or `xla`; inside `forced(...)`, the forced one."""
    value = _forced or os.environ.get("TFACD_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TFACD_KERNELS must be one of {BACKENDS}, got {value!r}")
    return value


@contextlib.contextmanager
def forced(setting: str):
    """Within the block, quantizers *traced* there use `setting` (`"cpp"`, `"xla"` or
    `"auto"`): for side-by-side measurements and tests. A function traced before keeps
    the kernels it was traced with."""
    global _forced
    if setting not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {setting!r}")
    previous, _forced = _forced, setting
    try:
        yield
    finally:
        _forced = previous


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "tfacd" / "kernels"
    return pathlib.Path(os.environ.get("TFACD_KERNEL_CACHE", default))


def _cpu_features() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key() -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), tf.__version__.encode(), _cpu_features().encode(),
                 sys.version.encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


# Tried in order. `-fno-trapping-math` lets GCC vectorize `floor` and the selects;
# `-ffp-contract=off` keeps `a * b + c` two roundings, as in the XLA functions.
# `-mno-avx512fp16`: TF's Eigen headers do not compile with GCC 12 where it is on.
_ARCH_FLAGS = (["-march=native", "-mno-avx512fp16"], ["-march=native"], [])


def _compile(target: pathlib.Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    errors = []
    for arch in _ARCH_FLAGS:
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            output = pathlib.Path(scratch) / target.name
            command = [compiler, "-std=c++17", "-shared", "-fPIC", "-O3", *arch,
                       "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-w",
                       str(SOURCE), "-o", str(output),
                       *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode == 0:
                output.replace(target)            # atomic: readers never see half a file
                return
            lines = result.stderr.strip().splitlines() or ["(no output)"]
            errors.append(next((line for line in lines if "error" in line), lines[-1]))
    raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {errors[-1]}")


def _build_and_load():
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"fake_quant_{_key()}.so"
    if not target.exists():
        # One build at a time (pytest-xdist workers, parallel runs); the others wait and
        # load what it wrote.
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _compile(target)
    return tf.load_op_library(str(target))


def library():
    """The loaded op library, or None when tfacd runs on the XLA functions (see module
    docstring). Raises `RuntimeError` when `TFACD_KERNELS=cpp` and the build fails."""
    global _library, _failure
    setting = backend_setting()
    if setting == "xla":
        return None
    if _library is None and _failure is None:
        try:
            _library = _build_and_load()
        except (OSError, RuntimeError, tf.errors.OpError) as error:
            _failure = str(error).strip().splitlines()[0] if str(error).strip() else \
                type(error).__name__
            if setting == "auto":
                warnings.warn(f"tfacd: C++ quantizer kernels unavailable ({_failure}); using "
                              "the XLA functions (same math, 2-3x slower quantizers). "
                              "Set TFACD_KERNELS=xla to skip the build.", RuntimeWarning,
                              stacklevel=2)
    if _library is None and setting == "cpp":
        raise RuntimeError(f"TFACD_KERNELS=cpp but the C++ kernels are unavailable: "
                           f"{_failure}")
    return _library


def backend() -> str:
    """`"cpp"` or `"xla"`: what the quantizers run on in this process."""
    return "cpp" if library() is not None else "xla"
