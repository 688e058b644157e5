"""MQE's OCB face normal, written out edge by edge as `calc_normal_vector_for_obc_reward` computes it
(`mqe/envs/wrappers/go1_push_mid_wrapper.py`): the reference the tests hold `mapush_env.nearest_face_normal` to."""
import torch


def mqe_normals(points: torch.Tensor, vertices) -> torch.Tensor:
    """Inward normals [N, 2] for object-frame points [N, 2] and a counter-clockwise `vertex_list`. Per edge: the
    perpendicular distance (|cross product| with the unit edge) where the foot lies on the edge, and the plain norms to
    its two vertices; the edge's distance is their first minimum, the nearest edge the first minimum over edges, and
    its normal (-unit_y, unit_x)."""
    vertices = torch.tensor(vertices)
    per_edge, normals = [], []
    for k in range(len(vertices)):
        a, b = vertices[k], vertices[(k + 1) % len(vertices)]
        e = b - a
        u = e / torch.norm(e)
        va, vb = points - a, points - b
        on_segment = ((va * e).sum(1) >= 0) & ((vb * e).sum(1) <= 0)
        line = torch.where(on_segment, torch.abs(va[:, 0] * u[1] - va[:, 1] * u[0]), torch.tensor(float("inf")))
        per_edge.append(torch.min(torch.stack([line, torch.norm(va, dim=1), torch.norm(vb, dim=1)], dim=1), dim=1)[0])
        normals.append(torch.stack([-u[1], u[0]]))
    return torch.stack(normals)[torch.min(torch.stack(per_edge, dim=1), dim=1)[1]]
