"""Dense checkpoint -> MoE checkpoint: sparse upcycling and PESC (``moectl upcycle``)."""
