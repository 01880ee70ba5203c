"""Device models.  They know nothing of KVM: each offers ``read(offset, size)`` and
``write(offset, data)`` to a bus, and talks back only through the callables it is given."""
