from eqbench.cli import main

raise SystemExit(main())
