"""Every parameter of a torch CLIP model random, for parity tests (test_clip, test_rewards)."""


def randomise_clip(model, seed):
    """Every parameter random: norm scales around 1, embeddings O(0.5), the rest O(0.15)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            before = p.detach().clone()
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                p.copy_(1.5 + torch.rand((), generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)
            assert not torch.equal(before, p), name
    return model.eval()
