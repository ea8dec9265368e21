"""Makes the copy of crates.io's limitador 0.14.0 that rls-server builds against.

The published crate does not compile with `default-features = false, features = ["redis_storage"]`:
`storage::keys::key_for_counter` calls into `mod bin` in every build, but `mod bin` and
`Counter::variables_for_key` sit behind `#[cfg(feature = "disk_storage")]`, and that feature builds
RocksDB from C++ sources. This removes exactly those two `cfg` lines, in a copy under
tests/rls-server/target/ (ignored by git): no third-party source lives in this repository. It also
turns off the build script, which only generates code for `distributed_storage`, so that its
build-dependency (tonic-build) is not compiled for nothing.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEST = HERE / "target" / "limitador-0.14.0"
MARK = "0.14.0 patch 2\n"
GATE = '#[cfg(feature = "disk_storage")]'
EDITS = {  # file -> the line each gate stands before
    "src/storage/keys.rs": "pub mod bin",
    "src/counter.rs": "fn variables_for_key",
}


def registry_source() -> Path:
    subprocess.run(["cargo", "fetch", "--manifest-path", str(HERE / "fetch" / "Cargo.toml")], check=True)
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    found = sorted(home.glob("registry/src/*/limitador-0.14.0"))
    if not found:
        sys.exit("limitador-0.14.0 is not in the cargo registry cache after `cargo fetch`")
    return found[0]


def main() -> None:
    if (DEST / ".patched").exists() and (DEST / ".patched").read_text() == MARK:
        return
    src = registry_source()
    if DEST.exists():
        shutil.rmtree(DEST)
    shutil.copytree(src, DEST)
    for rel, anchor in EDITS.items():
        path = DEST / rel
        lines = path.read_text().splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.strip() == GATE and i + 1 < len(lines) and anchor in lines[i + 1]:
                lines[i] = ""
                break
        else:
            sys.exit(f"{rel}: no `{GATE}` before `{anchor}`: has the crate changed?")
        path.write_text("".join(lines))
    manifest = DEST / "Cargo.toml"
    text = manifest.read_text().replace('build = "build.rs"', "build = false")
    start = text.find("[build-dependencies.tonic-build]")
    if start >= 0:
        end = text.find("\n[", start + 1)
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    manifest.write_text(text)
    (DEST / ".patched").write_text(MARK)
    print(f"patched limitador 0.14.0 into {DEST}")


if __name__ == "__main__":
    main()
