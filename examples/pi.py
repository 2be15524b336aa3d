"""Monte Carlo pi plus a small dependent task graph, on an embedded Shoal cluster.

    python examples/pi.py
"""

import random
import time

import libclient as ray


@ray.remote
def sample(n: int, seed: int) -> int:
    rng = random.Random(seed)
    return sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote
def square(x: int) -> int:
    return x * x


@ray.remote
def fan_out(n: int) -> list:
    # A task that submits tasks and waits for them (a nested, dynamic graph).
    return ray.get([square.remote(i) for i in range(n)])


def main() -> None:
    start = time.perf_counter()
    ray.init()
    print(f"cluster up in {time.perf_counter() - start:.2f}s: {ray.cluster_resources()}")

    per_task, tasks = 200_000, 8
    hits = ray.get([sample.remote(per_task, seed) for seed in range(tasks)])
    pi = 4.0 * sum(hits) / (per_task * tasks)
    print(f"pi ~= {pi:.5f} from {per_task * tasks:,} samples in {tasks} tasks")

    # Dependent graph: ((1+2) + (3+4)) squared, with refs passed between tasks.
    left = add.remote(1, 2)
    right = add.remote(3, 4)
    total = square.remote(add.remote(left, right))
    print(f"((1+2)+(3+4))^2 = {ray.get(total)}")
    print(f"squares from a nested task: {ray.get(fan_out.remote(6))}")
    ray.shutdown()


if __name__ == "__main__":
    main()
