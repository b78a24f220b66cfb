"""hpcopt: distributed and decentralized SGD methods over MPI, compared at HPC scale."""
__version__ = "0.1.0"
