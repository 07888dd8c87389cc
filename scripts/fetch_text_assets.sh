#!/usr/bin/env bash
# Unpacks the real text material of the vaderSentiment 3.3.2 sdist (MIT) from PyPI: the VADER lexicon and the
# hutto_ICWSM_2014 sentence sets (Rotten-Tomatoes movie snippets, NYT editorial snippets, with human ratings).
# Target: $TLRP_VADER_DIR (default ~/.cache/transformer_lrp/vader). The wheel does not contain the sentence sets.
set -euo pipefail
DEST="${TLRP_VADER_DIR:-$HOME/.cache/transformer_lrp/vader}"
if [ -f "$DEST/.complete" ]; then exit 0; fi
TMP="$(mktemp -d)"
python3 -m pip download --quiet --no-deps --no-binary :all: "vaderSentiment==3.3.2" -d "$TMP"
mkdir -p "$DEST"
tar xzf "$TMP"/vaderSentiment-3.3.2.tar.gz -C "$TMP"
tar xzf "$TMP"/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz -C "$DEST"
cp "$TMP"/vaderSentiment-3.3.2/vaderSentiment/vader_lexicon.txt "$DEST"/
cp "$TMP"/vaderSentiment-3.3.2/LICENSE* "$DEST"/ 2>/dev/null || true
touch "$DEST/.complete"
rm -rf "$TMP"
