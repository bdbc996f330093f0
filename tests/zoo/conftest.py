"""The zoo tests share tests/conftest.py's StageLog and the session's mnist_build fixture."""
