pytest_plugins = ["tests.emulators.fixtures"]
