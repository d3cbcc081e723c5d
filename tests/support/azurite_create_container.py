import base64, email.utils, hashlib, hmac, http.client, sys
port, container = sys.argv[1], sys.argv[2]
account = "devstoreaccount1"
key = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
date, version = email.utils.formatdate(usegmt=True), "2021-08-06"
to_sign = "PUT" + "\n" * 12 + f"x-ms-date:{date}\nx-ms-version:{version}\n" + f"/{account}/{account}/{container}\nrestype:container"
signature = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()
connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
connection.request("PUT", f"/{account}/{container}?restype=container", body=b"",
    headers={"x-ms-date": date, "x-ms-version": version, "Content-Length": "0",
             "Authorization": f"SharedKey {account}:{signature}"})
response = connection.getresponse()
if response.status not in (201, 409):  # 409: the container exists already
    sys.exit(f"creating container {container}: {response.status} {response.read()[:300]!r}")
