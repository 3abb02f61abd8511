"""Generated from proto/proto/testbus/v1 by hack/python-stubs: do not edit."""
