"""Test beds: a real SLURM cluster and a real two-node Ray cluster on one machine, for tests.

* ``cluster.testbed.slurm``: slurmctld and one slurmd per simulated host (``n1``/``n2`` in
  network namespaces on a bridge), configured in /etc/slurm/slurm.conf.
* ``cluster.testbed.ray``: a Ray head in the root network namespace and a worker node in a
  network namespace, with token authentication.
* ``cluster.testbed.common``: what both share: running commands and daemons, finding and killing
  processes, network namespaces joined to a bridge, the lock held while a bed starts or stops.

They are test infrastructure, not part of the product: they install packages, edit /etc/hosts and
/etc/slurm, create bridges and network namespaces, and so need root.  No product module imports
them (an import-linter contract in pyproject.toml says so) and the wheel leaves this package out;
they run from a checkout.  Each has a command line:
``python -m cluster.testbed.slurm start|stop|status`` and
``python -m cluster.testbed.ray start|stop|status|env|stop-worker|start-worker``.
"""
