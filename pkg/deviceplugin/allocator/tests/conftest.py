from pkg.deviceplugin.allocator.tests.support import clock, make_board

__all__ = ["clock", "make_board"]
