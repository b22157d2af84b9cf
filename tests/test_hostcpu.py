"""CPU facts from /proc/cpuinfo: the model, the flags that matter, native bf16 or not."""

from mmjax import hostcpu

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx fma avx2 bmi2

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx fma avx2 bmi2
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16 sve
CPU implementer\t: 0x41
"""


def test_parse_x86_and_arm():
  model, flags = hostcpu._parse(X86)
  assert model == "AMD EPYC 7B13" and {"avx2", "fma"} <= flags and "avx512f" not in flags
  _, arm_flags = hostcpu._parse(ARM)
  assert {"asimd", "bf16", "sve"} <= arm_flags


def test_native_bf16():
  assert hostcpu.native_bf16(hostcpu._parse(X86)[1]) is False  # AVX2 only: emulated bf16
  assert hostcpu.native_bf16(frozenset({"avx2", "avx512f", "avx512_bf16"})) is True
  assert hostcpu.native_bf16(frozenset({"amx_bf16"})) is True
  assert hostcpu.native_bf16(hostcpu._parse(ARM)[1]) is True
  assert hostcpu.native_bf16(frozenset()) is None  # nothing known


def test_describe_this_host():
  info = hostcpu.describe()
  assert info["model"] and info["cpus"] >= 1
  assert set(info["flags"]) <= set(hostcpu.SHOWN_FLAGS)
