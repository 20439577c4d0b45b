#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/) from the golden files
of tests/cpp/golden/ (valid inputs of every format), so each fuzzer starts from inputs its parser
accepts. Run from the repository root after regenerating the golden files."""
import os
import shutil
import sqlite3
import struct

G = "tests/cpp/golden"
C = "tests/fuzz/corpus"


def out(target, name, data):
    os.makedirs(os.path.join(C, target), exist_ok=True)
    with open(os.path.join(C, target, name), "wb") as f:
        f.write(data)


def read(name):
    with open(os.path.join(G, name), "rb") as f:
        return f.read()


def records(data):
    """(offset, header fields) of each record of a segment file."""
    at = 0
    while at + 128 <= len(data):
        (kind, codec) = struct.unpack_from("<BB", data, at + 8)
        meta_len = struct.unpack_from("<I", data, at + 12)[0]
        key = data[at + 16:at + 32]
        payload_offset = struct.unpack_from("<I", data, at + 64)[0]
        payload_len, record_len = struct.unpack_from("<QQ", data, at + 72)
        checksum = struct.unpack_from("<Q", data, at + 96)[0]
        yield at, dict(kind=kind, codec=codec, meta_len=meta_len, key=key, payload_offset=payload_offset,
                       payload_len=payload_len, record_len=record_len, checksum=checksum)
        at += record_len


for name in ("records_v1.kvs", "records_v2.kvs"):
    shutil.copy(os.path.join(G, name), os.path.join(C, "disk_record_fuzz", name))
for name in ("key_summary_f16.bin", "key_summary_f32.bin"):
    out("key_summary_fuzz", name, read(name))
out("model_spec_fuzz", "model_spec.bin", read("model_spec.bin"))

v2 = read("records_v2.kvs")
out("segment_meta_fuzz", "info.bin", b"\0\0" + read("segment_info.bin"))
for i, (at, h) in enumerate(r for r in records(v2) if r[1]["kind"] == 1):
    tokens = struct.unpack_from("<i", v2, at + 60)[0]
    out("segment_meta_fuzz", f"meta{i}.bin", struct.pack("<H", tokens) + v2[at + 128:at + 128 + h["meta_len"]])

# catalog_fuzz: rows (tests/fuzz/catalog_fuzz.cc) locating the records of records_v2.kvs, with the
# SegmentInfo blobs of the golden store's catalog.
db = sqlite3.connect(os.path.join(G, "store", "catalog.sqlite"))
infos = [row[0] for row in db.execute("SELECT info FROM records ORDER BY file_no, offset")]
db.close()
segs = [(at, h) for at, h in records(v2) if h["kind"] == 1]
rows = b""
for i, (at, h) in enumerate(segs):
    info = infos[i % len(infos)]
    rows += h["key"] + struct.pack("<BiiiiqBH", 1, at, h["record_len"], h["payload_offset"], h["payload_len"],
                                   h["checksum"] - (1 << 64) if h["checksum"] >= 1 << 63 else h["checksum"],
                                   h["codec"], len(info)) + info
files = struct.pack("<BBi", 1, 1, len(v2))
out("catalog_fuzz", "rows_all.bin", files + struct.pack("<B", len(segs)) + rows)
out("catalog_fuzz", "rows_none_file_scanned.bin", files + b"\0")
out("catalog_fuzz", "empty.bin", b"")

out("wire_fuzz", "mixed.bin", bytes([5, 0, 1, 2, 5, 6]) + b"\x07" + struct.pack("<IQ", 3, 9) + struct.pack("<I", 2) + b"ab")
out("wire_fuzz", "bytes.bin", bytes([2, 5, 5]) + struct.pack("<I", 1) + b"x" + struct.pack("<I", 0))
print("seeds written under", C)
