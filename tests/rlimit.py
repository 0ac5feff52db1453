"""The source a child script starts with to cap its own address space (RLIMIT_AS, Linux).

``cap(extra)`` sets the limit to the address space in use plus ``extra`` bytes, so that the next
large allocation fails in the CPU allocator itself ("DefaultCPUAllocator: can't allocate memory").
Processes the child starts inherit the limit.
"""

import textwrap

CAP = textwrap.dedent(
    """
    import resource

    def vm_bytes():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    def cap(extra):
        limit = vm_bytes() + extra
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    """
)
