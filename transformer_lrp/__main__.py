from transformer_lrp.cli import main

raise SystemExit(main())
