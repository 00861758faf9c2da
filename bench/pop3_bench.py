"""placeholder"""


def measurements(env, smoke):
    return []


def memory_measurements(env, smoke):
    return []
