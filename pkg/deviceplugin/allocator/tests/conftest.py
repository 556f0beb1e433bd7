from pkg.deviceplugin.allocator.tests.support import clock, make_board, writes

__all__ = ["clock", "make_board", "writes"]
