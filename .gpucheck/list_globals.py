import pickletools, sys, zipfile
from pathlib import Path
from finetune.run_directory import check_resume_is_safe, pickles_loaded_on_resume
checkpoint = Path(sys.argv[1])
for path in pickles_loaded_on_resume(checkpoint):
    z = zipfile.ZipFile(path); data = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    ops = list(pickletools.genops(data)); names = set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL": names.add(arg)
        if op.name == "STACK_GLOBAL": names.add(f"{ops[i-2][1]} {ops[i-1][1]}")
    print(path.relative_to(checkpoint), sorted(names))
check_resume_is_safe(checkpoint); print("check_resume_is_safe: OK")
