#!/usr/bin/env bash
# Fetch English prose for the demo into data/text/ (once; later runs reuse it) and print the file's path.
# Source: the Jargon File (public domain) from Debian's `jargon-text` package, unpacked with dpkg-deb, not installed;
# its chapters and glossary, about 235k words.
# Messages go to stderr; stdout is only the path, so: TEXT="$(bash scripts/fetch_text.sh)".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/data/text"
TXT="$OUT/jargon.txt"

if [ -s "$TXT" ]; then
  echo "$TXT"
  exit 0
fi

fail() {
  echo "[fetch_text] $1" >&2
  echo "[fetch_text] pass any English text file instead, e.g.: TEXT=/path/to/file.txt bash scripts/demo.sh" >&2
  exit 1
}

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || fail "no apt-get/dpkg-deb (not Debian/Ubuntu?)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "[fetch_text] downloading jargon-text (Debian package, ~650 kB)" >&2
# `apt-get download` needs the package lists; refresh them once if the package is unknown (needs root).
if ! (cd "$TMP" && apt-get download jargon-text >/dev/null 2>&1); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
  fi
  (cd "$TMP" && apt-get download jargon-text >/dev/null 2>&1) || fail "apt-get download jargon-text failed"
fi
dpkg-deb -x "$TMP"/jargon-text_*.deb "$TMP/x"
mkdir -p "$OUT"
gzip -dc "$TMP/x/usr/share/doc/jargon-text/jargon.txt.gz" > "$TMP/jargon.txt"
# Keep the File from "Chapter 1." on (a no-break space follows "Chapter", hence [^0-9]*): the front matter
# (contents, the much-copied public-domain notice) is not representative prose and scores a misleadingly low
# perplexity (7 rather than 40).
awk '/^Chapter[^0-9]*1\./ { found = 1 } found' "$TMP/jargon.txt" > "$TXT.tmp"
[ -s "$TXT.tmp" ] || cp "$TMP/jargon.txt" "$TXT.tmp"
mv "$TXT.tmp" "$TXT"  # only a complete file counts as "already fetched"
echo "[fetch_text] wrote $TXT ($(wc -w < "$TXT") words)" >&2
echo "$TXT"
