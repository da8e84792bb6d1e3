from corral.cli.commands import main

raise SystemExit(main())
