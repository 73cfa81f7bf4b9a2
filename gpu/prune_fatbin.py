"""Zero, in place, the GPU code inside shared libraries that a Hopper GPU (sm_90: H100, H200) can never run.

CUDA libraries carry their kernels in an ELF section `.nv_fatbin`: a run of fatbin blobs, each holding the same
kernels compiled for several architectures, as SASS (machine code for one architecture) or PTX (portable code the
driver compiles on load). For an sm_90 GPU the driver picks, per blob, the sm_90 SASS if there is one, else the
newest PTX of an architecture <= 90; SASS for any other architecture and PTX newer than 90 are never loaded there.
This script overwrites those payloads with zeros and leaves every header, offset and size as it was, so the library
still loads and links exactly as before while xz squeezes the zeros to almost nothing (vLLM's kernels are built for
sm_80 ... sm_120; most of their bytes go). A blob with nothing an sm_90 GPU can use is zeroed whole: its kernels
could not run on that GPU anyway.

With `--drop-kernels REGEX` a blob is also zeroed when every kernel in the code an sm_90 GPU would load from it has a
name (C++ mangled) that REGEX matches: gpu/pack.sh names vLLM's quantization, MoE, Mamba and MLA kernel families,
which a dense bf16 model never launches (whole blobs only: one that also holds a kernel outside REGEX is kept). CUDA
13 stores that code zstd-compressed; reading the names needs the `zstandard` package.

The result is ONLY for sm_90 GPUs: on any other GPU the zeroed kernels fail to load. A zeroed kernel that is launched
anyway fails with a CUDA error (the driver loads a blob when one of its kernels is first used: CUDA_MODULE_LOADING
must stay at its default, LAZY; EAGER loads every blob at start and fails).

Run alone:  python3 gpu/prune_fatbin.py [--dry-run] [--drop-kernels REGEX] LIB.so ...   (prints MiB kept / zeroed)
"""
from __future__ import annotations

import argparse
import mmap
import re
import struct

TARGET_SM = 90
BLOB_MAGIC = 0xBA55ED50
PTX, SASS = 1, 2  # entry kinds in a fatbin blob
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# cub's EmptyKernel is compiled into every translation unit that includes cub; it says nothing about the blob.
NEUTRAL_KERNEL = re.compile(r"EmptyKernel")


def fatbin_section(buf: mmap.mmap) -> tuple[int, int] | None:
    """(file offset, size) of the `.nv_fatbin` section of a 64-bit little-endian ELF file, or None."""
    if buf[:4] != b"\x7fELF" or buf[4] != 2 or buf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", buf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)
    names_off, = struct.unpack_from("<Q", buf, shoff + shstrndx * shentsize + 24)
    for i in range(shnum):
        header = shoff + i * shentsize
        name_at, = struct.unpack_from("<I", buf, header)
        offset, size = struct.unpack_from("<QQ", buf, header + 24)
        end = buf.find(b"\0", names_off + name_at)
        if buf[names_off + name_at:end] == b".nv_fatbin":
            return offset, size
    return None


def kernel_names(kind: int, payload: bytes) -> set[str]:
    """Names of the kernels in one fatbin entry: `.text.NAME` sections of SASS (an ELF), `.entry NAME` of PTX."""
    if payload[:4] == ZSTD_MAGIC:
        import zstandard

        payload = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    pattern = rb"\.text\.([A-Za-z0-9_$.]+)" if kind == SASS else rb"\.entry ([A-Za-z0-9_$]+)"
    return {m.decode() for m in re.findall(pattern, payload)}


def prune(path: str, dry_run: bool, drop_kernels: re.Pattern | None = None) -> tuple[int, int]:
    """Zero what sm_90 cannot (or, by `drop_kernels`, need not) run in one library; returns (bytes kept, bytes
    zeroed) of GPU code."""
    with open(path, "rb" if dry_run else "r+b") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ if dry_run else mmap.ACCESS_WRITE)
        section = fatbin_section(buf)
        if section is None:
            return 0, 0
        pos, section_end = section[0], section[0] + section[1]
        kept = zeroed = 0
        while pos + 16 <= section_end:
            magic, _version, header_size, blob_size = struct.unpack_from("<IHHQ", buf, pos)
            if magic != BLOB_MAGIC:  # blobs are 8-byte aligned with padding between them
                pos += 8
                continue
            entries, entry, blob_end = [], pos + header_size, pos + header_size + blob_size
            while entry < blob_end:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", buf, entry)
                if entry_header == 0:
                    break
                arch, = struct.unpack_from("<I", buf, entry + 28)
                entries.append((kind, arch, entry + entry_header, payload))
                entry += entry_header + payload
            has_sass = any(kind == SASS and arch == TARGET_SM for kind, arch, _, _ in entries)
            runs = [(kind == SASS and arch == TARGET_SM) if has_sass else (kind == PTX and arch <= TARGET_SM)
                    for kind, arch, _, _ in entries]
            if drop_kernels is not None and any(runs):
                names = set().union(*(kernel_names(kind, bytes(buf[start:start + payload]))
                                      for (kind, _, start, payload), r in zip(entries, runs) if r))
                names = {n for n in names if not NEUTRAL_KERNEL.search(n)}
                if names and all(drop_kernels.search(n) for n in names):
                    runs = [False] * len(entries)
            for (kind, arch, start, payload), run in zip(entries, runs):
                if run:
                    kept += payload
                else:
                    zeroed += payload
                    if not dry_run:
                        buf[start:start + payload] = bytes(payload)
            pos = blob_end
        if not dry_run:
            buf.flush()
        buf.close()
    return kept, zeroed


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("libs", nargs="+")
    p.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    p.add_argument("--drop-kernels", type=re.compile, help="also zero blobs whose kernels all match this regex")
    a = p.parse_args()
    for lib in a.libs:
        k, z = prune(lib, a.dry_run, a.drop_kernels)
        dry = " (dry run)" if a.dry_run else ""
        print(f"{lib}: GPU code kept {k / 2**20:.1f} MiB, zeroed {z / 2**20:.1f} MiB{dry}")
