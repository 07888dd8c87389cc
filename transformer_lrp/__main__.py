import sys

try:
    from transformer_lrp.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and friends import: one line too, not a traceback
    print("transformer-lrp: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
