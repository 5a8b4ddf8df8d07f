"Data: the synthetic set, local files, the loaders, and clear errors on bad input."
import numpy as np, pytest, torch
from PIL import Image
import pickle
from vqlearn.data import (get_dataset, make_shapes, load_npz, ArrayDataset, DeviceLoader, get_loader, split_dataset,
                          KaoKore, DATASETS, SHAPES, CIFAR10_CLASSES, STL10_CLASSES, select_classes, image_batches,
                          save_codes, load_codes, CodeMaps, epoch_generator)

def test_shapes_deterministic_and_sized():
    a, la = make_shapes(10, size=48, seed=5)
    b, lb = make_shapes(10, size=48, seed=5)
    assert a.shape == (10, 3, 48, 48) and a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(la, lb)
    ds = get_dataset('shapes', n=20, size=96)
    x, y = ds[3]
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1 and y.dtype == torch.int64

def test_shapes_are_learnable_but_not_trivial():
    "Classes differ on average (the shape is visible) but no single pixel statistic separates them."
    imgs, labels = make_shapes(1500, seed=0)
    x = imgs.float() / 255
    assert x.std(0).mean() > 0.15                        # the images vary
    assert (x.flatten(1).std(1) > 0.05).float().mean() > 0.95   # hardly any flat image

def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as e: get_dataset('imagenet')
    assert all(n in str(e.value) for n in DATASETS)

def test_unknown_class_lists_choices():
    with pytest.raises(ValueError) as e: get_dataset('shapes', n=10, classes=['pegasus'])
    assert 'pegasus' in str(e.value) and 'circle' in str(e.value)

def test_class_subset_remaps_labels():
    ds = get_dataset('shapes', n=200, classes=['cross', 'circle'])
    full = get_dataset('shapes', n=200)
    assert ds.classes == ['cross', 'circle'] and set(ds.labels.tolist()) == {0, 1}
    assert torch.equal(ds.images[ds.labels == 0], full.images[full.labels == SHAPES.index('cross')])

def test_cifar_missing_offline_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e: get_dataset('cifar10', root=tmp_path, download=False)
    assert str(tmp_path) in str(e.value) and 'Download' in str(e.value)

def test_kaokore_missing_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e: get_dataset('kaokore', root=tmp_path / 'kk', download=False)
    assert 'labels.csv' in str(e.value) and 'images_256' in str(e.value)

def test_kaokore_fake_copy(tmp_path):
    (tmp_path / 'images_256').mkdir()
    rows = ['image,gender,status,set']
    for i in range(8):
        Image.fromarray(np.full((256, 256, 3), i * 30, np.uint8)).save(tmp_path / 'images_256' / f'{i:08d}.jpg')
        rows.append(f'{i:08d}.jpg,{i % 2},{i % 4},{["train", "dev", "test"][i % 3]}')
    (tmp_path / 'labels.csv').write_text('\n'.join(rows) + '\n')
    ds = get_dataset('kaokore', root=tmp_path, download=False, label='gender', size=32)
    assert len(ds) == 3 and ds.classes == ['male', 'female'] and ds[0][0].shape == (3, 32, 32)
    assert [int(ds[i][1]) for i in range(3)] == [0, 1, 0]   # images 0, 3, 6
    assert len(KaoKore(tmp_path, split='dev', label='status')) == 3
    with pytest.raises(ValueError): KaoKore(tmp_path, split='valid')
    with pytest.raises(ValueError): KaoKore(tmp_path, label='age')

def _npz(path, **arrays):
    np.savez(path, **arrays); return path

def test_npz_round_trip_and_classes(tmp_path):
    imgs, labels = make_shapes(30, seed=1)
    p = _npz(tmp_path / 'd.npz', images=imgs.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(), classes=np.array(SHAPES))
    ds = get_dataset('npz', root=p)
    assert torch.equal(ds.images, imgs) and ds.classes == SHAPES
    sub = get_dataset('npz', root=p, classes=['ring'], size=16)
    assert sub.images.shape[1:] == (3, 16, 16) and (sub.labels == 0).all() and len(sub) == int((labels == 3).sum())

@pytest.mark.parametrize('arrays,msg', [
    (dict(images=np.zeros((4, 32, 32, 3), np.float32), labels=np.zeros(4, np.int64)), 'uint8'),
    (dict(images=np.zeros((4, 3, 32, 32), np.uint8), labels=np.zeros(4, np.int64)), '(N, H, W, 3)'),
    (dict(images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(5, np.int64)), 'labels'),
    (dict(pictures=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64)), "'images'"),
])
def test_npz_bad_arrays(tmp_path, arrays, msg):
    p = _npz(tmp_path / 'bad.npz', **arrays)
    with pytest.raises(ValueError) as e: load_npz(p)
    assert msg in str(e.value)

def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e: get_dataset('npz', root=tmp_path / 'nope.npz')
    assert 'nope.npz' in str(e.value)

def test_npz_and_folder_need_root_and_have_no_test_split(tmp_path):
    with pytest.raises(ValueError): get_dataset('npz')
    with pytest.raises(ValueError): get_dataset('folder', root=tmp_path, train=False)

def test_array_dataset_validates():
    with pytest.raises(ValueError): ArrayDataset(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.zeros(2))
    with pytest.raises(ValueError): ArrayDataset(torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError): ArrayDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3))

def test_device_loader_epochs_cover_data_and_replay():
    ds = get_dataset('shapes', n=130)
    dl = DeviceLoader(ds, batch_size=32, flip=True, seed=7)
    assert len(dl) == 5
    ys = torch.cat([y for _, y in dl])
    assert torch.equal(ys.sort().values, ds.labels.sort().values)
    a = [x for x, _ in DeviceLoader(ds, 32, flip=True, seed=7).iter_epoch(3)]
    b = [x for x, _ in DeviceLoader(ds, 32, flip=True, seed=7).iter_epoch(3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(TypeError): DeviceLoader([1, 2, 3])

def test_get_loader_plain_path(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset
    tds = TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10))
    dl = get_loader(tds, batch_size=4, flip=True)
    assert isinstance(dl, DataLoader)
    x, y = next(iter(dl))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64

def test_split_dataset_is_disjoint_and_deterministic():
    ds = get_dataset('shapes', n=100)
    tr, va = split_dataset(ds, 0.2, seed=3)
    tr2, va2 = split_dataset(ds, 0.2, seed=3)
    assert len(tr) == 80 and len(va) == 20 and torch.equal(va.images, va2.images)
    assert not (tr.images.flatten(1)[:, None] == va.images.flatten(1)[None]).all(-1).any()

def test_kaokore_download_follows_official_method(tmp_path):
    "download_kaokore reads labels.csv + urls.txt from the repository and saves line i as images_256/{i:08d}.jpg (file:// here)."
    from vqlearn.data import download_kaokore
    repo, src = tmp_path / 'repo', tmp_path / 'src'
    repo.mkdir(); src.mkdir()
    urls = []
    for i in range(3):
        Image.fromarray(np.full((256, 256), 40 * i, np.uint8), mode='L').save(src / f'{i}.png')  # greyscale -> RGB on save
        urls.append((src / f'{i}.png').as_uri())
    (repo / 'urls.txt').write_text('\n'.join(urls[:1] + [''] + urls[1:]) + '\n')   # an empty line keeps its index
    (repo / 'labels.csv').write_text('image,gender,status,set\n00000000.jpg,0,1,train\n00000002.jpg,1,3,train\n00000003.jpg,0,0,test\n')
    root = download_kaokore(tmp_path / 'kk', threads=2, base_url=repo.as_uri())
    assert sorted(p.name for p in (root / 'images_256').iterdir()) == ['00000000.jpg', '00000002.jpg', '00000003.jpg']
    with Image.open(root / 'images_256' / '00000002.jpg') as im: assert im.mode == 'RGB' and im.size == (256, 256)
    ds = get_dataset('kaokore', root=root, download=False, size=16)
    assert len(ds) == 2 and [int(ds[i][1]) for i in range(2)] == [1, 3]


# ---- the one tensor loader -------------------------------------------------------------------------------------------

def _order(dl):
    "The item order of one pass over a loader of (indices,) tuples."
    return torch.cat([b[0] for b in dl])

def test_device_loader_new_epoch_every_pass():
    "Each pass is a new, different permutation; an early break moves on; the plan is replayable from (seed, epoch)."
    dl = DeviceLoader((torch.arange(200),), batch_size=20, seed=4, device='cpu')
    e0, e1 = _order(dl), _order(dl)
    assert sorted(e0.tolist()) == list(range(200)) and sorted(e1.tolist()) == list(range(200))
    assert (e0 != e1).float().mean() > 0.5 and (e0 != torch.arange(200)).float().mean() > 0.5  # shuffled, differently
    for first, in dl: break                                  # epoch 2, stopped after one batch
    second = next(iter(dl))[0]                               # epoch 3: a new epoch, not a replay of epoch 2
    assert dl.epoch == 4 and not torch.equal(first, second)
    again = DeviceLoader((torch.arange(200),), batch_size=20, seed=4, device='cpu')
    assert torch.equal(torch.cat([b[0] for b in again.iter_epoch(1)]), e1)          # replay epoch 1
    assert torch.equal(next(again.iter_epoch(3))[0], second)
    assert torch.equal(next(again.iter_epoch(1, start=2))[0], e1[40:60])                # ... from any batch
    assert torch.equal(_order(DeviceLoader((torch.arange(50),), 7, shuffle=False, device='cpu')), torch.arange(50))
    assert not torch.equal(_order(DeviceLoader((torch.arange(200),), 20, seed=5, device='cpu')), e0)  # the seed matters

def test_device_loader_tuples_keep_dtypes_and_rows():
    codes = torch.arange(30)[:, None, None].expand(30, 4, 4).contiguous()      # map i is filled with i
    labels = (torch.arange(30) % 3).to(torch.int32)
    dl = DeviceLoader((codes, labels, None), batch_size=8, drop_last=True, device='cpu')
    assert len(dl) == 3 and len(DeviceLoader((codes,), 8, device='cpu')) == 4
    for c, y, none in dl:
        assert c.dtype == torch.int64 and c.shape == (8, 4, 4) and y.dtype == torch.int32 and none is None
        assert torch.equal(c[:, 0, 0] % 3, y.long())                          # rows stay together
    x, y = next(iter(DeviceLoader(get_dataset('shapes', n=10), 4, device='cpu')))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64

@pytest.mark.parametrize('make,err,msg', [
    (lambda: DeviceLoader((torch.zeros(10, 4, 4, dtype=torch.long),), 4, flip=True), ValueError, 'images'),
    (lambda: DeviceLoader((torch.zeros(0, 3, 8, 8),), 4), ValueError, 'empty'),
    (lambda: DeviceLoader(ArrayDataset(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)), 4), ValueError, 'empty'),
    (lambda: DeviceLoader((torch.zeros(10),), 0), ValueError, 'batch_size'),
    (lambda: DeviceLoader((torch.zeros(10),), 16, drop_last=True), ValueError, 'drop_last'),
    (lambda: DeviceLoader((torch.zeros(10), torch.zeros(9)), 4), ValueError, 'first dimension'),
    (lambda: DeviceLoader([1, 2, 3]), TypeError, 'ArrayDataset'),
    (lambda: get_loader(torch.utils.data.TensorDataset(torch.zeros(0, 3, 4, 4), torch.zeros(0)), 4), ValueError, 'empty'),
    (lambda: get_loader(torch.utils.data.TensorDataset(torch.zeros(4, 3, 4, 4), torch.zeros(4)), 0), ValueError, 'batch_size'),
])
def test_loader_errors_are_clear(make, err, msg):
    with pytest.raises(err) as e: make()
    assert msg in str(e.value)

def _mirrored_fraction(x, orig):
    same, mirrored = (x == orig).flatten(1).all(1), (x == orig.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()                      # every image is the stored one or its mirror image
    return mirrored.float().mean().item()

def test_device_loader_flips_about_half_and_differently_each_epoch():
    ds = get_dataset('shapes', n=400)
    dl = DeviceLoader(ds, batch_size=400, shuffle=False, flip=True, seed=1, device='cpu')
    (x0, _), (x1, _) = next(iter(dl)), next(iter(dl))
    orig = ds.images.float() / 255
    assert 0.4 < _mirrored_fraction(x0, orig) < 0.6 and 0.4 < _mirrored_fraction(x1, orig) < 0.6
    assert not torch.equal(x0, x1)                       # new flips in a new epoch
    assert _mirrored_fraction(next(iter(DeviceLoader(ds, 400, shuffle=False, device='cpu')))[0], orig) == 0  # no flip asked
    imgs = ds.images[:200]                               # a tuple of uint8 images flips too, and stays uint8
    xt, = next(iter(DeviceLoader((imgs,), 200, shuffle=False, flip=True, device='cpu')))
    assert xt.dtype == torch.uint8 and 0.3 < _mirrored_fraction(xt, imgs) < 0.7

def test_get_loader_plain_path_flips():
    "A lazy dataset gets a torch DataLoader; flip=True must mirror about half of its images too."
    from torch.utils.data import TensorDataset
    imgs = torch.rand(200, 3, 8, 8)
    x = torch.cat([x for x, _ in get_loader(TensorDataset(imgs, torch.arange(200)), batch_size=50, shuffle=False, flip=True)])
    assert 0.3 < _mirrored_fraction(x, imgs) < 0.7
    x = torch.cat([x for x, _ in get_loader(TensorDataset(imgs, torch.arange(200)), batch_size=50, shuffle=False)])
    assert _mirrored_fraction(x, imgs) == 0

def test_epoch_generator_depends_on_seed_and_epoch():
    draw = lambda s, e: torch.randperm(20, generator=epoch_generator(s, e))
    assert torch.equal(draw(1, 2), draw(1, 2)) and not torch.equal(draw(1, 2), draw(1, 3)) and not torch.equal(draw(1, 2), draw(2, 2))

# ---- batching images in order ----------------------------------------------------------------------------------------

def test_image_batches_sources():
    ds = get_dataset('shapes', n=70)
    ref = ds.images.float() / 255
    cat = lambda it: [torch.cat(t) for t in zip(*it)]
    x, y = cat(image_batches(ds, 32, 'cpu'))
    assert torch.equal(x, ref) and torch.equal(y, ds.labels)
    x, y = cat(image_batches(ds.images, 32, 'cpu'))                            # uint8 -> / 255, labels unknown
    assert torch.equal(x, ref) and (y == -1).all() and y.dtype == torch.int64
    x, _ = cat(image_batches(ref * 0.5, 32, 'cpu'))                            # float images are kept as they are
    assert torch.allclose(x, ref * 0.5)
    x, y = cat(image_batches((ds.images, ds.labels.int()), 32, 'cpu'))
    assert torch.equal(x, ref) and y.dtype == torch.int64 and torch.equal(y, ds.labels)
    x, y = cat(image_batches(DeviceLoader(ds, 16, shuffle=False, device='cpu'), device='cpu'))
    assert torch.equal(x, ref) and torch.equal(y, ds.labels)
    x, y = cat(image_batches([ds.images[:40], ds.images[40:]], device='cpu'))  # a loader of x batches
    assert torch.equal(x, ref) and (y == -1).all()
    with pytest.raises(TypeError) as e: next(image_batches(ds.images.int(), device='cpu'))
    assert 'int32' in str(e.value)
    with pytest.raises(ValueError): next(image_batches(ds.images[0], device='cpu'))
    with pytest.raises(ValueError): next(image_batches((ds.images, ds.labels.float()), device='cpu'))
    with pytest.raises(TypeError): next(image_batches(3, device='cpu'))

# ---- code files ------------------------------------------------------------------------------------------------------

def _maps(n=6):
    g = torch.Generator().manual_seed(0)
    return {'top': torch.randint(0, 8, (n, 2, 2), generator=g), 'bottom': torch.randint(0, 32, (n, 4, 4), generator=g)}

def test_code_files_round_trip(tmp_path):
    maps, labels = _maps(), torch.tensor([0, 1, 2, 0, 1, -1])
    p = save_codes(tmp_path / 'c.safetensors', maps, labels.int(), {'top': 8, 'bottom': 32}, split='test', classes=['a', 'b', 'c'])
    c = load_codes(p)
    assert isinstance(c, CodeMaps) and list(c.maps) == ['top', 'bottom'] and c.num_codes == {'top': 8, 'bottom': 32}
    assert all(torch.equal(c.maps[k], maps[k]) and c.maps[k].dtype == torch.int64 for k in maps)
    assert torch.equal(c.labels, labels) and c.labels.dtype == torch.int64
    assert c.meta == {'split': 'test', 'classes': ['a', 'b', 'c']}

@pytest.mark.parametrize('change,msg', [
    (dict(maps={'codes': torch.rand(6, 4, 4)}, num_codes={'codes': 8}), 'integer'),
    (dict(maps={'codes': torch.full((6, 4, 4), 8)}, num_codes={'codes': 8}), '[0, 8)'),
    (dict(maps={'codes': torch.full((6, 4, 4), -1)}, num_codes={'codes': 8}), '[0, 8)'),
    (dict(maps={'codes': torch.zeros(5, 4, 4, dtype=torch.long)}, num_codes={'codes': 8}), '(6, h, w)'),
    (dict(maps={'codes': torch.zeros(6, 4, 4, dtype=torch.long)}, num_codes={'other': 8}), 'num_codes'),
    (dict(labels=torch.zeros(6)), 'labels'),
    (dict(labels=torch.zeros(6, 1, dtype=torch.long)), 'labels'),
])
def test_code_files_checked_on_save_and_load(tmp_path, change, msg):
    from vqlearn.core import save_tensors
    args = dict(maps={'codes': torch.zeros(6, 4, 4, dtype=torch.long)}, labels=torch.zeros(6, dtype=torch.long), num_codes={'codes': 8}) | change
    p = tmp_path / 'bad.safetensors'
    with pytest.raises(ValueError) as e: save_codes(p, **args)
    assert str(p) in str(e.value) and msg in str(e.value) and not p.exists()
    # a file written by other means is checked again on load
    save_tensors(p, {f'maps.{k}': v for k, v in args['maps'].items()} | {'labels': args['labels']},
                 {'format': 'vqlearn-codes-1', 'maps': list(args['maps']), 'num_codes': args['num_codes']})
    with pytest.raises(ValueError) as e: load_codes(p)
    assert str(p) in str(e.value) and msg in str(e.value)

def test_code_files_corrupt_or_foreign(tmp_path):
    from vqlearn.core import save_tensors
    p = save_codes(tmp_path / 'c.safetensors', _maps(), torch.zeros(6, dtype=torch.long), {'top': 8, 'bottom': 32})
    p.write_bytes(p.read_bytes()[:-20])                                        # truncated
    with pytest.raises(ValueError) as e: load_codes(p)
    assert str(p) in str(e.value)
    q = save_tensors(tmp_path / 'model.safetensors', {'w': torch.zeros(2)}, {'format': 'vqlearn-model-1'})
    with pytest.raises(ValueError) as e: load_codes(q)
    assert str(q) in str(e.value) and 'not a code file' in str(e.value)
    with pytest.raises(ValueError): save_codes(tmp_path / 'x.safetensors', _maps(), torch.zeros(6, dtype=torch.long), {'top': 8, 'bottom': 32}, format='x')

# ---- class names, splits, labels and arguments -----------------------------------------------------------------------

def test_select_classes_one_name_or_a_list():
    imgs, labels = torch.arange(10)[:, None], torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    x, y, names = select_classes(imgs, labels, ['a', 'b', 'c'], 'c')
    assert names == ['c'] and x.flatten().tolist() == [2, 5, 8] and (y == 0).all()
    x, y, names = select_classes(list('abcdefghij'), labels, ['a', 'b', 'c'], ['c', 'a'])   # a list of items works too
    assert names == ['c', 'a'] and x == ['a', 'c', 'd', 'f', 'g', 'i', 'j'] and y.tolist() == [1, 0, 1, 0, 1, 0, 1]
    x, y, names = select_classes(imgs, labels, ('a', 'b', 'c'), None)
    assert names == ['a', 'b', 'c'] and torch.equal(y, labels)
    for bad, err in [('ab', ValueError), (['a', 'a'], ValueError), ([], TypeError), ([1], TypeError)]:
        with pytest.raises(err): select_classes(imgs, labels, ['a', 'b', 'c'], bad)
    with pytest.raises(ValueError): select_classes(imgs, labels + 1, ['a', 'b', 'c'], 'a')       # label 3 of 3 classes

def test_single_class_name_everywhere(tmp_path):
    ds = get_dataset('shapes', n=100, classes='ring')
    assert ds.classes == ['ring'] and (ds.labels == 0).all() and len(ds) == int((get_dataset('shapes', n=100).labels == 3).sum())
    imgs, labels = make_shapes(30, seed=1)
    p = _npz(tmp_path / 'd.npz', images=imgs.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(), classes=np.array(SHAPES))
    assert get_dataset('npz', root=p, classes='cross').classes == ['cross']
    for i in range(6):
        (tmp_path / 'f' / SHAPES[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).save(tmp_path / 'f' / SHAPES[i % 2] / f'{i}.png')
    fds = get_dataset('folder', root=tmp_path / 'f', classes='square')
    assert fds.classes == ['square'] and len(fds) == 3 and all(int(fds[i][1]) == 0 for i in range(3))

def test_kaokore_single_class_name(tmp_path):
    "classes='female' is one name, not the letters f, e, m, a, l, e ('male' must not match inside it)."
    (tmp_path / 'images_256').mkdir()
    rows = ['image,gender,status,set']
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), i * 30, np.uint8)).save(tmp_path / 'images_256' / f'{i:08d}.jpg')
        rows.append(f'{i:08d}.jpg,{i % 2},{i % 4},train')
    (tmp_path / 'labels.csv').write_text('\n'.join(rows) + '\n')
    ds = get_dataset('kaokore', root=tmp_path, download=False, label='gender', classes='female', size=8)
    assert ds.classes == ['female'] and len(ds) == 4 and all(int(ds[i][1]) == 0 for i in range(4))
    both = get_dataset('kaokore', root=tmp_path, download=False, label='gender', classes=['female', 'male'], size=8)
    assert [int(both[i][1]) for i in range(8)] == [1, 0] * 4
    with pytest.raises(ValueError) as e: get_dataset('kaokore', root=tmp_path / 'none', download=False, classes='queen')
    assert 'queen' in str(e.value)                        # checked before looking for the data

@pytest.mark.parametrize('name', ['cifar10', 'stl10', 'shapes'])
@pytest.mark.parametrize('train', ['valid', 'TEST', 1, 0, None, 'unlabeled'])
def test_train_must_be_bool_or_split_name(tmp_path, name, train):
    if name == 'stl10' and train == 'unlabeled': return
    with pytest.raises(ValueError) as e: get_dataset(name, train=train, root=tmp_path, download=False, n=4) if name == 'shapes' \
        else get_dataset(name, train=train, root=tmp_path, download=False)
    assert 'train' in str(e.value) and repr(train) in str(e.value)

def test_shapes_test_split_is_its_own():
    test = get_dataset('shapes', train=False, n=40)
    assert torch.equal(test.images, make_shapes(40, seed=1)[0])
    assert torch.equal(get_dataset('shapes', train='test', n=40).images, test.images)
    assert torch.equal(get_dataset('shapes', train='train', n=40).images, make_shapes(40, seed=0)[0])
    assert torch.equal(get_dataset('shapes', train=False, n=40, seed=2).images, make_shapes(40, seed=5)[0])

def _fake_cifar10(root, monkeypatch, n_per_batch=6):
    "A tiny CIFAR-10 in torchvision's pickle layout: train batch b holds images filled with b + 1, the test batch with 200."
    import torchvision.datasets.cifar as tv_cifar
    folder = root / 'cifar-10-batches-py'; folder.mkdir(parents=True)
    def batch(value, labels): return {'data': np.full((len(labels), 3072), value, np.uint8), 'labels': list(labels)}
    for b in range(5):
        with open(folder / f'data_batch_{b + 1}', 'wb') as f: pickle.dump(batch(b + 1, [(b + i) % 10 for i in range(n_per_batch)]), f)
    with open(folder / 'test_batch', 'wb') as f: pickle.dump(batch(200, [7, 2, 7, 7, 0]), f)
    with open(folder / 'batches.meta', 'wb') as f: pickle.dump({'label_names': CIFAR10_CLASSES}, f)
    monkeypatch.setattr(tv_cifar.CIFAR10, '_check_integrity', lambda self: True)
    monkeypatch.setattr(tv_cifar, 'check_integrity', lambda *a, **k: True)

def test_cifar10_splits_from_a_fake_copy(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, monkeypatch)
    train = get_dataset('cifar10', root=tmp_path, download=False)
    assert len(train) == 30 and set(train.images.unique().tolist()) == {1, 2, 3, 4, 5} and train.classes == CIFAR10_CLASSES
    for split in (False, 'test'):
        test = get_dataset('cifar10', train=split, root=tmp_path, download=False)
        assert len(test) == 5 and (test.images == 200).all() and test.labels.tolist() == [7, 2, 7, 7, 0]
    horses = get_dataset('cifar10', train=False, classes='horse', root=tmp_path, download=False, size=16)
    assert horses.classes == ['horse'] and len(horses) == 3 and (horses.labels == 0).all() and horses.images.shape[-1] == 16
    two = get_dataset('cifar10', train='test', classes=['horse', 'airplane'], root=tmp_path, download=False)
    assert two.labels.tolist() == [0, 0, 0, 1]

@pytest.mark.parametrize('name,known', [('cifar10', 'horse'), ('stl10', 'monkey')])
def test_class_names_checked_before_data(tmp_path, name, known):
    with pytest.raises(ValueError) as e: get_dataset(name, classes=['unicorn'], root=tmp_path / 'empty', download=False)
    assert 'unicorn' in str(e.value) and known in str(e.value)
    assert known in (CIFAR10_CLASSES if name == 'cifar10' else STL10_CLASSES)

@pytest.mark.parametrize('name', ['cifar10', 'stl10', 'npz', 'folder', 'shapes', 'kaokore'])
def test_unknown_arguments_raise(tmp_path, name):
    imgs, labels = make_shapes(4)
    p = _npz(tmp_path / 'd.npz', images=imgs.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    root = {'npz': p, 'folder': tmp_path}.get(name, tmp_path / 'none')
    with pytest.raises(TypeError) as e: get_dataset(name, root=root, download=False, colour='red')
    assert 'colour' in str(e.value)

@pytest.mark.parametrize('labels,msg', [
    (torch.tensor([0.0, 1.7, 2.0]), 'integers'),
    (torch.tensor([0, -1, 2]), '[0, 3)'),
    (torch.tensor([0, 1, 3]), '[0, 3)'),
    (torch.tensor([True, False, True]), 'integers'),
])
def test_array_dataset_checks_labels(labels, msg):
    with pytest.raises(ValueError) as e: ArrayDataset(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), labels, ['a', 'b', 'c'])
    assert msg in str(e.value)
    assert ArrayDataset(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 4, 1], dtype=torch.int16)).classes == list('01234')

@pytest.mark.parametrize('labels,classes', [([0, -1, 1, 0], None), ([0, 1, 5, 0], SHAPES[:3])])
def test_npz_labels_range(tmp_path, labels, classes):
    arrays = dict(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array(labels))
    if classes: arrays['classes'] = np.array(classes)
    with pytest.raises(ValueError) as e: load_npz(_npz(tmp_path / 'l.npz', **arrays))
    assert 'labels' in str(e.value) and str(tmp_path / 'l.npz') in str(e.value)
