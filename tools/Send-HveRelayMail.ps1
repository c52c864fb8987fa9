<#
.SYNOPSIS
    Send mail through hve-relay's POST /api/send, with the parameters of Send-MailMessage.

.DESCRIPTION
    Builds one mail request (hve-relay contract v1) and posts it with Invoke-RestMethod. Attachments
    are read from disk and sent base64-encoded (the body may be up to HTTP_SEND_MAX_BYTES, 1 MiB by
    default: bigger files go over the queue as blobs, see docs/producers.md). Returns the relay's
    answer: the request id and the path of its status (GET /api/requests/<id>).

    Not run by the project's tests (no PowerShell there); docs/producers.md has the tested curl and
    Python equivalents.

.EXAMPLE
    . ./tools/Send-HveRelayMail.ps1
    Send-HveRelayMail -Uri https://my-relay.azurewebsites.net -FunctionKey $key -To ann@contoso.com `
        -Subject 'Invoice 1042' -Body '<p>Attached.</p>' -BodyAsHtml -Attachments ./invoice-1042.pdf -Id invoice-1042
#>

function Send-HveRelayMail {
    [CmdletBinding()]
    param(
        # Base URL of the function app, e.g. https://my-relay.azurewebsites.net (or $env:HVE_RELAY_URL).
        [Parameter()] [string] $Uri = $env:HVE_RELAY_URL,
        # A function key of the app (or $env:HVE_RELAY_KEY). With Entra ID authentication use -Headers instead.
        [Parameter()] [string] $FunctionKey = $env:HVE_RELAY_KEY,
        [Parameter(Mandatory = $true)] [string[]] $To,
        [Parameter()] [string[]] $Cc,
        [Parameter()] [string[]] $Bcc,
        [Parameter()] [string] $Subject = '',
        [Parameter(Mandatory = $true)] [string] $Body,
        # The body is HTML (like Send-MailMessage -BodyAsHtml); otherwise plain text.
        [Parameter()] [switch] $BodyAsHtml,
        # Paths of files to attach.
        [Parameter()] [string[]] $Attachments,
        # The HVE account to send as (HVE has no Send As: it must be one of the relay's HVE_ACCOUNTS).
        [Parameter()] [string] $From,
        # Idempotency key: the same id and content again is the same mail, never a second one.
        [Parameter()] [string] $Id,
        [Parameter()] [string] $Category,
        # Extra HTTP headers, e.g. @{ Authorization = "Bearer $token" } with App Service authentication.
        [Parameter()] [hashtable] $Headers = @{}
    )

    if (-not $Uri) { throw 'Give -Uri (or set $env:HVE_RELAY_URL).' }
    $types = @{
        '.pdf' = 'application/pdf'; '.txt' = 'text/plain'; '.csv' = 'text/csv'; '.html' = 'text/html'
        '.png' = 'image/png'; '.jpg' = 'image/jpeg'; '.jpeg' = 'image/jpeg'; '.gif' = 'image/gif'
        '.zip' = 'application/zip'; '.json' = 'application/json'; '.xml' = 'application/xml'
        '.docx' = 'application/vnd.openxmlformats-officedocument.wordprocessingml.document'
        '.xlsx' = 'application/vnd.openxmlformats-officedocument.spreadsheetml.sheet'
    }

    $request = [ordered]@{}
    if ($Id) { $request.id = $Id }
    $request.to = @($To)
    if ($Cc) { $request.cc = @($Cc) }
    if ($Bcc) { $request.bcc = @($Bcc) }
    $request.subject = $Subject
    if ($BodyAsHtml) { $request.html = $Body } else { $request.text = $Body }
    if ($From) { $request.account = $From }
    if ($Category) { $request.category = $Category }
    if ($Attachments) {
        $request.attachments = @(foreach ($path in $Attachments) {
            $file = Get-Item -LiteralPath $path -ErrorAction Stop
            $type = $types[$file.Extension.ToLowerInvariant()]
            [ordered]@{
                name          = $file.Name
                contentType   = $(if ($type) { $type } else { 'application/octet-stream' })
                contentBase64 = [Convert]::ToBase64String([IO.File]::ReadAllBytes($file.FullName))
            }
        })
    }

    $json = $request | ConvertTo-Json -Depth 5 -Compress
    $callHeaders = @{} + $Headers
    if ($FunctionKey) { $callHeaders['x-functions-key'] = $FunctionKey }
    # Bytes, not a string: Windows PowerShell 5.1 would otherwise send non-ASCII text in the wrong encoding.
    Invoke-RestMethod -Method Post -Uri ($Uri.TrimEnd('/') + '/api/send') -Headers $callHeaders `
        -ContentType 'application/json; charset=utf-8' -Body ([Text.Encoding]::UTF8.GetBytes($json))
}
