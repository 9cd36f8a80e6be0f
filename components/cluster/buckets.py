"""Create the buckets the platform writes to, if missing (the chart runs it before MLflow starts when
it bundles MinIO: a fresh MinIO has no buckets, and MLflow's first upload would fail).

    python -m components.cluster.buckets s3://omni-mlflow/artifacts s3://omni-platform/trainjobs

Endpoint and keys come from S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Idempotent.
"""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit

from model.storage import S3Store, StorageConfig


def ensure_buckets(uris: list[str], cfg: StorageConfig | None = None) -> list[str]:
    """The bucket of each s3:// URI exists afterwards; returns the bucket names in order."""
    buckets = []
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"{uri!r}: expected s3://bucket[/prefix]")
        if parts.netloc not in buckets:
            S3Store(parts.netloc, "", cfg or StorageConfig.from_env()).ensure_bucket()
            buckets.append(parts.netloc)
    return buckets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.cluster.buckets", description=__doc__.split("\n\n")[0])
    parser.add_argument("uris", nargs="+", help="s3:// URIs whose buckets must exist")
    for bucket in ensure_buckets(parser.parse_args(argv).uris):
        print(f"bucket {bucket} ready", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
