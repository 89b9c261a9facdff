from dtprobe.cli import main

raise SystemExit(main())
