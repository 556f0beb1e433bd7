"""``python -m cmd.kyb_device_plugin``: the plugin's entry point.

The directory is ``kyb_device_plugin`` because a Python module name cannot hold a hyphen;
the installed console script is ``kyb-device-plugin``. Both enter through
:func:`pkg.deviceplugin.cli.main`.
"""
