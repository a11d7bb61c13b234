from zsq.cli import main

raise SystemExit(main())
