"""A peer-neutral agent replay: real agent traces against any OpenAI-compatible server.

`traces` reads the Claude Code, Mooncake and tau-bench traces into sessions of hash-id requests,
`prompts` turns hash ids into token ids (equal ids, equal tokens; scaled), `client` replays sessions with
their arrival and think times and sub-agents over streaming ``/v1/completions``, `peers` starts the servers
compared under one memory budget, `report` computes the figures and draws the plot, `run` is the command
(``python -m benchmarks.agent_replay``).
"""
