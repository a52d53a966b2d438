"""kvstrata as a cluster on Ray Serve (docs/cluster.md): engine replicas behind one ingress, routing that
follows the KV, failover through the shared tier, prefill/decode disaggregation.

Ray is an optional dependency (`pip install 'kvstrata[cluster]'`): nothing outside this package imports
it, and `kvstrata serve` imports this package only when a cluster flag is given.

    launch.py       ClusterOptions, build_app (the Ray Serve application), run (`kvstrata serve --replicas N`)
    ingress.py      the FastAPI ingress deployment: hints, forwarding (streams too), retries, P/D
    replica.py      EngineReplica: the single-process server app inside a Ray Serve replica
    router.py       KVAwareRouter, Ray Serve's RequestRouter: affinity, longest cached prefix, load
    hints.py        ForwardRequest / RouteHints, affinity keys, the prompt ids the ingress can know
    events.py       KV events in vLLM's schema, published by each replica to a Redis stream
    index.py        KVIndex (replica -> blocks), followed from the stream
    pd.py           prefill/decode handover: shared tier or Ray's object store
    redis_local.py  a local redis-server when no --kv-redis-url is given
    metrics.py      the cluster's Prometheus metrics
"""
