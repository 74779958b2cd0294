#!/usr/bin/env bash
# Build orch as one zipapp (default dist/orch.pyz): `python3 orch.pyz ...` runs on any python3 >= 3.11
# with nothing pip-installed. Every runtime dependency rides inside as pure Python; no compiled extension
# may be in it (aiohttp, multidict, yarl, frozenlist, propcache and PyYAML fall back to their pure code).
#
#   ./zipapp.sh [OUTPUT.pyz]      PYTHON=python3.12 ./zipapp.sh   (the Python that builds; needs pip)
#
# Needs pip and access to a package index. Build files go to build/zipapp/{src,stage} (or under
# $ZIPAPP_BUILD_DIR), wiped first on every run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="${1:-$ROOT/dist/orch.pyz}"
mkdir -p "$(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"   # relative to the caller's directory

# The oldest Python the pyz must run on: wheels and dependency markers are chosen for it.
MIN_PY=3.11
# Dependencies with no pure-Python wheel on PyPI: installed as this platform's wheel, then stripped of
# their compiled part (PyYAML's _yaml extension; `import yaml` then uses the pure loader).
NO_PURE_WHEEL="pyyaml"

BUILD="${ZIPAPP_BUILD_DIR:-$ROOT/build/zipapp}"
SRC="$BUILD/src"
STAGE="$BUILD/stage"

say() { printf 'zipapp: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON must be Python >= 3.11 (set PYTHON=...)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (python3 -m ensurepip, or apt install python3-pip)"

# pip --target installs into a folder, never into an environment: user-level pip settings that demand a
# virtualenv or a --user install do not apply (and would make pip refuse).
export PIP_REQUIRE_VIRTUALENV=0 PIP_USER=0 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
pip_target() { "$PYTHON" -m pip install --quiet --no-compile --target "$STAGE" "$@"; }

rm -rf "$SRC" "$STAGE"
mkdir -p "$SRC" "$STAGE"

# ---- orch itself, from a clean copy of the sources (no stale setuptools build/ dir, no __pycache__)
cp -R "$ROOT/pyproject.toml" "$ROOT/orch" "$SRC/"
for f in README.md LICENSE; do
    if [[ -e "$ROOT/$f" ]]; then cp "$ROOT/$f" "$SRC/"; fi
done
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
say "installing orch"
pip_target --no-deps "$SRC"
rm -rf "$STAGE/bin"   # console scripts: not needed, and pip warns when the next install adds to bin/

# lines_of TEXT: TEXT's non-empty lines, one array item each, in LINES (bash 3.2 has no mapfile)
lines_of() {
    LINES=()
    while IFS= read -r line; do
        if [[ -n "$line" ]]; then LINES+=("$line"); fi
    done <<<"$1"
}

# ---- its dependencies, from pyproject.toml
deps="$("$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
)"
lines_of "$deps"
PURE=()
PLATFORM=()
for req in "${LINES[@]}"; do
    name="$(printf '%s' "$req" | sed -E 's/^[[:space:]]*([A-Za-z0-9._-]+).*/\1/' | tr 'A-Z_.' 'a-z--')"
    if [[ " $NO_PURE_WHEEL " == *" $name "* ]]; then PLATFORM+=("$req"); else PURE+=("$req"); fi
done

# pip evaluates dependency markers (`typing-extensions; python_version < "3.13"`) for the Python running
# it, not for --python-version: built with 3.13, the pyz would lack what 3.11 needs. After installing,
# list every requirement some Python from MIN_PY on needs but the pyz lacks, add those, and go again.
missing_requirements() {
    "$PYTHON" - "$STAGE" "$MIN_PY" <<'EOF'
import sys
from importlib.metadata import distributions
try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

stage, minimum = sys.argv[1], tuple(int(x) for x in sys.argv[2].split("."))
have = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions(path=[stage])}
pythons = [(3, minor) for minor in range(minimum[1], max(sys.version_info[1], minimum[1] + 4) + 1)]
envs = [{**default_environment(), "python_version": f"{ma}.{mi}", "python_full_version": f"{ma}.{mi}.0",
         "extra": ""} for ma, mi in pythons]
missing, bad = set(), []
for dist in distributions(path=[stage]):
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker and not any(req.marker.evaluate(env) for env in envs):
            continue
        name = canonicalize_name(req.name)
        if name not in have:
            missing.add(f"{req.name}{req.specifier}")
        elif not req.specifier.contains(have[name], prereleases=True):
            bad.append(f"{dist.metadata['Name']} needs {req}, got {have[name]}")
if bad:
    sys.exit("zipapp: error: inconsistent dependencies:\n  " + "\n  ".join(bad))
print("\n".join(sorted(missing)))
EOF
}

EXTRA=()
for round in 1 2 3; do
    say "installing dependencies (pure-Python wheels for Python $MIN_PY+)"
    # Only py3-none-any wheels: nothing is compiled, nothing compiled comes along.
    pip_target --only-binary=:all: --platform any --implementation py --abi none --python-version "$MIN_PY" \
        "${PURE[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
    if ((${#PLATFORM[@]})); then
        say "installing ${PLATFORM[*]} (platform wheel; its compiled part is dropped)"
        pip_target --prefer-binary --no-deps "${PLATFORM[@]}"
    fi
    missing="$(missing_requirements)"
    if [[ -z "$missing" ]]; then break; fi
    lines_of "$missing"
    ((round < 3)) || die "still missing after $round rounds: ${LINES[*]}"
    say "also needed on older Pythons: ${LINES[*]}; installing again"
    EXTRA+=("${LINES[@]}")
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    pip_target --no-deps "$SRC"
    rm -rf "$STAGE/bin"
done

# ---- plugins carried inside (ZIPAPP_PLUGINS="examples/orch-hello-runner other-plugin==1.2", space-separated
# paths or requirements, no dependencies of theirs): their entry points (orch.runners) are found in the zipapp.
for plugin in ${ZIPAPP_PLUGINS:-}; do
    say "installing plugin $plugin"
    pip_target --no-deps "$plugin"
done
rm -rf "$STAGE/bin"

# ---- strip what cannot or need not run from a zip. dist-info folders stay: code may ask
# importlib.metadata for a version or entry points.
find "$STAGE" \( -name '*.so' -o -name '*.pyd' -o -name '*.dylib' \) -type f -print -delete | sed 's/^/zipapp: dropped /' >&2
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$STAGE/bin"

# The pure fallbacks must take over, with no C accelerators anywhere.
"$PYTHON" -I -B - "$STAGE" <<'EOF' || die "the staged packages do not import as pure Python"
import sys
sys.path.insert(0, sys.argv[1])
import aiohttp.http_parser, frozenlist, multidict, propcache, yaml, yarl, orch.cli  # noqa: F401
assert not yaml.__with_libyaml__, "PyYAML uses libyaml"
assert multidict.MultiDict.__module__ == "multidict._multidict_py", multidict.MultiDict.__module__
assert aiohttp.http_parser.HttpRequestParser.__module__ == "aiohttp.http_parser", "aiohttp uses its C parser"
for name, mod in list(sys.modules.items()):
    path = getattr(mod, "__file__", None) or ""
    assert not path.endswith((".so", ".pyd")) or not path.startswith(sys.argv[1]), f"{name} is compiled: {path}"
EOF

# ---- bytecode. zipimport never writes .pyc files, so without them every start compiles aiohttp, rich,
# typer... from source again (about 1.1 s of a 1.4 s `--help`). Legacy .pyc files next to the .py (-b)
# are what zipimport reads; unchecked-hash ones do not depend on zip timestamps. A Python of another
# version finds a bad magic number, ignores them and compiles the source, as without them.
# Code objects name their file "orch.pyz/aiohttp/client.py" and not the build machine's staging path.
"$PYTHON" -m compileall -q -b -j 0 --invalidation-mode unchecked-hash -s "$STAGE" -p "$(basename "$OUT")" "$STAGE" \
    >/dev/null || say "warning: some files did not compile; they will load from source"

# ---- the zipapp (compressed: a third of the size, no slower to start)
rm -f "$OUT"
"$PYTHON" -m zipapp "$STAGE" -m "orch.cli:main" -p "/usr/bin/env python3" --compress -o "$OUT"
chmod +x "$OUT"

"$PYTHON" - "$OUT" <<'EOF' || die "$OUT holds compiled extension modules"
import sys, zipfile
bad = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith((".so", ".pyd", ".dylib"))]
sys.exit(f"compiled files: {bad}" if bad else 0)
EOF
"$PYTHON" -I "$OUT" --help >/dev/null || die "$OUT does not run"

size="$(wc -c <"$OUT" | tr -d ' ')"
printf '%s  %s bytes (%s KiB)\n' "$OUT" "$size" "$((size / 1024))"
