"""Checkpoint upload throughput: our path (manifest + sha256 + tuned multipart) vs plain boto3.

    python benchmarks/checkpoint_upload.py                      # 1 GiB checkpoint, local S3 server
    python benchmarks/checkpoint_upload.py --gib 4 --rounds 3

Writes a fake checkpoint (model shard + optimizer shards, random bytes) of --gib GiB, starts
moto's S3 server on 127.0.0.1 (or uses AWS_ENDPOINT_URL_S3 / real S3 with --bucket), and uploads
the same files alternately through `S3CheckpointStore.upload` and through boto3's
`upload_file` with its default settings, printing MB/s for each and the ratio. Our path also
hashes every byte (sha256) for the manifest, so the ratio includes that cost.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MIB = 1024 * 1024


def write_checkpoint(root: Path, gib: float) -> Path:
    directory = root / "checkpoint-1000"
    (directory / "global_step1000").mkdir(parents=True)
    total = int(gib * 1024 * MIB)
    sizes = {"model.safetensors": total // 4, "global_step1000/optim_rank0.pt": total // 4,
             "global_step1000/optim_rank1.pt": total // 4, "global_step1000/optim_rank2.pt": total - 3 * (total // 4)}
    for name, size in sizes.items():
        with open(directory / name, "wb") as handle:
            for _ in range(size // (64 * MIB)):
                handle.write(os.urandom(64 * MIB))
            handle.write(os.urandom(size % (64 * MIB)))
    (directory / "trainer_state.json").write_text('{"global_step": 1000}')
    return directory


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):  # 30 s at most
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto_server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="Checkpoint size in GiB.")
    parser.add_argument("--rounds", type=int, default=2, help="Uploads per path (alternating).")
    parser.add_argument("--bucket", default="", help="An existing bucket (real S3); default: a local moto server.")
    args = parser.parse_args()

    server = None
    if not args.bucket:
        server, endpoint = start_moto()
        os.environ.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
    import boto3

    from training.checkpoint_store import S3CheckpointStore

    client = boto3.client("s3")
    bucket = args.bucket or "bench"
    if not args.bucket:
        client.create_bucket(Bucket=bucket)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = write_checkpoint(Path(tmp), args.gib)
            files = [p for p in checkpoint.rglob("*") if p.is_file()]
            size_mb = sum(p.stat().st_size for p in files) / 1e6
            rates: dict[str, list[float]] = {"ours": [], "boto3": []}
            for round_ in range(args.rounds):
                started = time.perf_counter()
                S3CheckpointStore(f"s3://{bucket}/ours/{round_}").upload(checkpoint)
                rates["ours"].append(size_mb / (time.perf_counter() - started))
                started = time.perf_counter()
                for path in files:
                    client.upload_file(str(path), bucket, f"plain/{round_}/{path.relative_to(checkpoint)}")
                rates["boto3"].append(size_mb / (time.perf_counter() - started))
    finally:
        if server:
            server.terminate()
    ours, plain = statistics.median(rates["ours"]), statistics.median(rates["boto3"])
    print(f"checkpoint {size_mb:.0f} MB in {len(files)} files, {args.rounds} rounds, "
          f"{'moto on 127.0.0.1' if server else 's3://' + bucket}")
    print(f"ours (sha256 + 4 files x 8 parts of 16 MB): {ours:8.1f} MB/s   {[round(r) for r in rates['ours']]}")
    print(f"boto3 upload_file (defaults), file by file: {plain:8.1f} MB/s   {[round(r) for r in rates['boto3']]}")
    print(f"ratio ours / boto3: {ours / plain:.2f}")


if __name__ == "__main__":
    main()
