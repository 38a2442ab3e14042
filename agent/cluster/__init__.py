"""A model across hosts: the agents plan vLLM's multi-node group, start it, and watch it.

vLLM carries its own traffic (torch.distributed and its message queues); the agents only talk to
each other about who is there: each worker agent sends the head agent a heartbeat (an HTTP POST
under /health, with the health token) carrying its detection and the state of its engine, and
learns from the answer what its engine must run. docs/cluster.md tells the whole story.

- ``network``: the interface and address vLLM's traffic uses, and the private-address rule;
- ``protocol``: the heartbeat and its answer, and the engine spec a worker runs;
- ``coordinator``: the head's view of the members (who is there, who was lost, the group's epoch);
- ``link``: a worker's heartbeat loop to the head;
- ``headless``: the process that runs vLLM's headless executor for a worker's rank;
- ``vllm_ext``: a worker extension vLLM loads into its workers (pipeline buffers on the CPU build);
- ``runtime``: what ``serve`` wires in for each role (routes, tasks, backends).
"""
