from benchmarks.agent_replay.run import main

raise SystemExit(main())
