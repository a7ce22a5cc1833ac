from cifar_inception.cli import main

raise SystemExit(main())
