"""placeholder"""


def measurements(env, smoke):
    return []
