// hve-relay: everything the relay needs in one resource group.
//
//   az deployment group create -g <rg> -f infra/main.bicep -p @infra/main.parameters.json
//
// infra/deploy.sh wraps that, writes the secrets and deploys the code (infra/README.md).
// Every app setting is in `appSettings` below; tests/test_infra.py checks that list against
// shared/settings.py in both directions.

targetScope = 'resourceGroup'

// ---------------------------------------------------------------- deployment

@minLength(1)
@maxLength(64)
@description('Name of the environment (e.g. hve-relay-prod): tags every resource and seeds the resource names.')
param environmentName string

@minLength(1)
@description('Azure region of all resources (one that offers Flex Consumption).')
param location string = resourceGroup().location

@description('Object id of the user or service principal running the deployment; it gets Key Vault Secrets Officer and queue Message Sender so infra/deploy.sh can write the secrets and a first request, and the operator roles (operatorPrincipalIds). Empty: no deployer roles.')
param deployerPrincipalId string = ''

@description('Type of deployerPrincipalId.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string = 'User'

@description('Object ids of further operators who run the operations tools (tools.ledger, .status, .poison, .enqueue) from their own machines: Storage Table Data Reader on the account, Storage Queue Data Contributor on the mail queue and its poison queue. The deployer gets them too.')
param operatorPrincipalIds array = []

@description('Type of every operatorPrincipalIds entry.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param operatorPrincipalType string = 'User'

@description('Storage redundancy.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSkuName string = 'Standard_LRS'

@description('Most instances the function app scales out to. The rate governor, not this number, paces HVE.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory of one function app instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Zone-redundant Flex Consumption plan (region must support it; pair it with storageSkuName Standard_ZRS or Standard_GZRS).')
param zoneRedundant bool = false

@description('Days Log Analytics keeps telemetry.')
@minValue(30)
@maxValue(730)
param logRetentionInDays int = 30

// ---------------------------------------------------------------- Entra ID permissions

@description('Grant the app identity Microsoft Graph User.Read.All (needed by the welcome scan): infra/deploy.sh deploys modules/graph.bicep after this template. The deployer needs Privileged Role Administrator or Global Administrator.')
param grantGraphUserReadAll bool = false

@description('Grant the app identity the Office 365 Exchange Online application role Mail.Send for XOAUTH2 (HVE_AUTH=oauth). Same admin rights as above.')
param grantExchangeMailSend bool = false

@description('Grant the app identity Microsoft Graph ExchangeMessageTrace.Read.All (delivery confirmation): infra/deploy.sh deploys modules/graph.bicep after this template. Same admin rights as above; the tenant also needs the service principal of app 8bd644d1-64a1-4d4b-ae52-2e0cbf64e373 (infra/README.md).')
param grantGraphMessageTrace bool = false

// ---------------------------------------------------------------- HVE

@minLength(1)
@description('HVE account addresses the relay may send as.')
param hveAccounts array

@description('Accepted domains of the tenant; any other recipient domain is external.')
param hveInternalDomains array

@description('basic: passwords from Key Vault (set by infra/deploy.sh); oauth: XOAUTH2 with the managed identity (grantExchangeMailSend and Add-HVEAppAccess).')
@allowed([
  'basic'
  'oauth'
])
param hveAuth string = 'basic'

@description('Display name on the From header.')
param hveSenderName string = ''

@description('Every message carries Auto-Submitted: auto-generated (RFC 3834), so auto-responders do not answer it.')
param mailAutoSubmitted bool = true

@description('Every message carries X-Auto-Response-Suppress: All (Exchange: no out-of-office, auto-reply, receipt or NDR back to the HVE account).')
param mailSuppressAutoResponses bool = true

@description('ga-2026: external recipients refused; preview-2024: external allowed, rate limited.')
@allowed([
  'ga-2026'
  'preview-2024'
])
param hveLimitsProfile string = 'ga-2026'

@description('Single limits of the profile to override, e.g. {"recipients_per_message": 20}.')
param hveLimits object = {}

@description('Cost guard: most recipients per daily window across all accounts (0: no guard).')
@minValue(0)
param hveDailyRecipientBudget int = 0

@description('Time of day (UTC, HH:MM) at which the daily windows (quotas, budget) start.')
param hveDailyResetUtc string = '00:00'

@description('Seconds added to each rolling-minute pacing window (HVE counts a message when it arrives).')
@minValue(0)
param hvePacingMarginSeconds int = 2

@description('Recipients one request may have; above the per-message limit a request is sent as several SMTP transactions.')
@minValue(1)
param maxRecipientsPerRequest int = 500

@description('HVE SMTP endpoint.')
param hveSmtpHost string = 'smtp.hve.mx.microsoft'

@description('HVE SMTP port (STARTTLS).')
param hveSmtpPort int = 587

@description('Timeout of one SMTP command, in seconds.')
param hveSmtpTimeoutSeconds int = 30

@description('Token scope for XOAUTH2.')
param hveOauthScope string = 'https://outlook.office365.com/.default'

@description('How long a password read from Key Vault is cached, in seconds.')
param hveSecretCacheSeconds int = 300

@description('Open SMTP sessions kept per HVE account in one worker process.')
param hvePoolSize int = 4

@description('An idle SMTP session older than this many seconds is closed.')
param hvePoolIdleSeconds int = 60

@description('Longest wait for a free SMTP session of an account, in seconds.')
param hvePoolWaitSeconds int = 10

@description('How far ahead the governor books send slots, in seconds.')
param hveBookingHorizonSeconds int = 3600

@description('At most this many booked slots fall due in one second (0: no spreading).')
param hveBookingsPerSecond int = 8

@description('While slots are booked ahead, a pacer message comes back this often (seconds) so the host keeps polling; 0: off.')
param hvePacerSeconds int = 2

@description('Longest early wake (and in-process wait) of a booked request before its slot, in seconds; 0 turns it off.')
param hveSlotWaitSeconds int = 3

@description('How often a worker reads the queue length to keep bookings behind the visible backlog, in seconds; 0 turns it off.')
param hveBacklogSampleSeconds int = 1

@description('A visible backlog of at most this many messages is not treated as congestion.')
param hveBacklogMinMessages int = 64

@description('Seconds an account that failed authentication is left out of rotation.')
param accountUnhealthySeconds int = 900

@description('Seconds an account is rested after HVE throttles it.')
param accountCooldownSeconds int = 60

@description('Attempts before a request is recorded as dead.')
param sendMaxAttempts int = 12

@description('Hours after which a still-undelivered request is recorded as dead.')
param sendMaxAgeHours int = 72

@description('First retry delay in seconds; doubles per attempt, with jitter.')
param retryBaseSeconds int = 30

@description('Cap of the retry delay, in seconds.')
param retryMaxSeconds int = 3600

@description('Days the relay keeps who was mailed (ledger, chunk, recipient-index, delivery, welcome and aggregate rows; blobs left under the relay\'s prefixes); longer than sendMaxAgeHours.')
@minValue(4)
param ledgerRetentionDays int = 90

@description('Skip recipients on the suppression list (5xx at RCPT, message trace failed with a 5.x.x reason, added by an operator).')
param suppressionEnabled bool = true

@description('Days a recipient stays suppressed after its last permanent failure; at most ledgerRetentionDays.')
@minValue(1)
param suppressionDays int = 30

@description('NCRONTAB schedule of the purge_expired timer (retention and lost-in-flight requests).')
param retentionSchedule string = '0 30 2 * * *'

@description('Rows purge_expired deletes per table in one run at most.')
@minValue(1)
param retentionMaxRowsPerRun int = 20000

@description('Hours after which a ledger row still `sending` is recorded as dead (lost-in-flight).')
@minValue(1)
param lostInFlightHours int = 24

@description('Seconds a request in state sending is left alone before it is sent again (same Message-ID).')
param sendingLeaseSeconds int = 120

@description('Attachments one request may have; more is refused before anything is downloaded.')
param maxAttachments int = 20

@description('Seconds between two merges of a worker process\'s counts into the aggregates table (report).')
param aggregatesFlushSeconds int = 10

@description('Rows one aggregate (hour, account, category) may be spread over under contention.')
@minValue(1)
param aggregatesShards int = 8

@description('Minutes after the end of a UTC day from which the report reads it from its rollup rows.')
@minValue(1)
param aggregatesRollupAfterMinutes int = 120

@description('Seconds of counts a worker process keeps in memory while the aggregates table cannot be written; older ones are given up (the most a killed process loses).')
@minValue(1)
param aggregatesMaxBufferSeconds int = 60

@description('Distinct categories per worker process and UTC hour counted apart in the aggregates (later ones under `other`); the report shows this many, the rest under `other`. 0: no cap.')
@minValue(0)
param aggregatesMaxCategories int = 50

@description('HVE price in USD per million recipients, for the report\'s cost estimate (a decimal string).')
param hvePricePerMillionRecipients string = '42'

@description('Longest span in days GET /api/report answers.')
@minValue(1)
param reportMaxDays int = 31

@description('Largest body POST /api/send accepts, in bytes (413 above it); at most 16 MiB.')
@minValue(1024)
@maxValue(16777216)
param httpSendMaxBytes int = 1048576

@description('Client IP ranges (CIDR, e.g. 203.0.113.0/24) allowed to call the app\'s HTTP routes (/api/send, /api/requests, /api/status, /api/report, /api/dashboard); every other address is denied by the app\'s access restrictions (ipSecurityRestrictions). Empty: no restriction (function keys only). Queue and timer triggers are not affected.')
param allowedClientIpRanges array = []

@description('OTLP/HTTP endpoint for telemetry; used only when Application Insights is not (leave empty in Azure).')
param otelExporterOtlpEndpoint string = ''

// ---------------------------------------------------------------- producers

@description('Producers, each an Entra principal with a producer name: [{ name: \'billing\', principalId: \'<object id>\' }], optionally principalType per entry (else producerPrincipalType). Each gets Storage Queue Data Message Sender on the mail queue and Storage Blob Data Contributor on the claim-check container with a condition: every blob action only under `requests/<name>/`. The names, lower-cased, are BLOB_PRODUCERS (lower-case letters, digits and \'-\'; never `http` or `hve-relay`, the relay\'s own). infra/README.md, Producers.')
param producers array = []

@description('Object ids of queue-only producers (no claim checks, no blob attachments): Storage Queue Data Message Sender on the mail queue each, nothing else. A principal is in producers or here, not both, and is not deployerPrincipalId.')
param producerPrincipalIds array = []

@description('Principal type of producerPrincipalIds and of producers entries without principalType (a managed identity or an app registration is a ServicePrincipal).')
@allowed([
  'ServicePrincipal'
  'User'
  'Group'
])
param producerPrincipalType string = 'ServicePrincipal'

// ---------------------------------------------------------------- welcome scan

@description('Run the welcome scan of new users (needs grantGraphUserReadAll, or an admin granting User.Read.All).')
param welcomeEnabled bool = false

@description('NCRONTAB schedule of the welcome scan.')
param welcomeSchedule string = '0 */15 * * * *'

@description('How far back the first welcome scan looks (ISO 8601 duration).')
param welcomeLookback string = 'P7D'

@description('Only welcome members of this group (object id); empty: all users.')
param welcomeGroupId string = ''

@description('Address Bcc\'d on every welcome mail.')
param welcomeBcc string = ''

@description('Each welcome scan re-reads users created this long before the previous scan (ISO 8601 duration).')
param welcomeOverlap string = 'PT1H'

@description('Days a new user not yet eligible (no mailbox, disabled, not in the group) is re-checked before being skipped.')
@minValue(0)
param welcomePendingDays int = 3

@description('Welcome templates instead of the built-in ones: `blob:<container>/<prefix>` in the app\'s storage account (create the container yourself), or empty.')
param welcomeTemplates string = ''

@description('Outlook on the web link in the welcome mail.')
param welcomeOutlookUrl string = 'https://outlook.office.com/mail/'

@description('FAQ link in the welcome mail; empty: no FAQ paragraph.')
param welcomeFaqUrl string = ''

@description('Support address offered in the welcome mail; empty: no support paragraph.')
param welcomeSupportAddress string = ''

@description('Microsoft Graph base URL.')
param graphBaseUrl string = 'https://graph.microsoft.com'

// ---------------------------------------------------------------- delivery confirmation (message trace)

@description('Run the confirm_delivery timer (needs grantGraphMessageTrace, or an admin granting ExchangeMessageTrace.Read.All).')
param deliveryTraceEnabled bool = false

@description('NCRONTAB schedule of the confirm_delivery timer.')
param deliveryTraceSchedule string = '0 */10 * * * *'

@description('Recipients still pending are re-checked until final or this old (ISO 8601 duration, under 90 days).')
param deliveryTraceMaxAge string = 'P3D'

@description('Graph message-trace requests the relay spends in any 5 minutes (Graph allows 100 per tenant, shared).')
@minValue(1)
@maxValue(100)
param deliveryTraceRequestsPer5Min int = 60

// ---------------------------------------------------------------- outcome events (docs/producers.md)

@description('Storage queue (in the app\'s account) that gets an outcome event (CloudEvents 1.0) when a request becomes final or its delivery counts change; empty: none. Consumers need Storage Queue Data Message Processor on it.')
param eventsQueueName string = ''

@description('Deploy an Event Grid custom topic (modules/events.bicep) that gets the same events, with the app identity as its EventGrid Data Sender.')
param enableEventGridTopic bool = false

@description('The events\' source is /hve-relay/<this>; empty: the function app\'s name.')
param eventsSource string = ''

// ---------------------------------------------------------------- names

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
  application: 'hve-relay'
}
var functionAppName = '${abbrs.webSitesFunctions}${resourceToken}'
var keyVaultName = '${abbrs.keyVaultVaults}${resourceToken}'

// Storage names: the code's defaults (shared/settings.py), set explicitly below.
var mailQueueName = 'outbound-mail'
var poisonQueueName = '${mailQueueName}-poison'
// The priority lane: its own queue and trigger (send_mail_priority), the same send stage.
var priorityQueueName = 'outbound-mail-priority'
var priorityPoisonQueueName = '${priorityQueueName}-poison'
var ledgerTableName = 'hveledger'
var recipientIndexTableName = 'hverecipients'
var governorTableName = 'hvegovernor'
var aggregatesTableName = 'hveaggregates'
var welcomeTableName = 'hvewelcome'
var deliveryTableName = 'hvedelivery'
var suppressionTableName = 'hvesuppression'
var claimCheckContainerName = 'mail-payloads'
// The relay's own copies (deferred requests too big for a queue message): only the app's identity
// has a role on it; never grant a producer anything here.
var relayStateContainerName = 'hve-relay-state'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'

// Producers, normalised once: the role assignments (modules/rbac.bicep) and BLOB_PRODUCERS come from
// this one list, so a producer's prefix and the name the relay accepts cannot drift apart.
var producerGrants = [for producer in producers: {
  name: toLower(producer.name)
  principalId: producer.principalId
  principalType: contains(producer, 'principalType') ? producer.principalType : producerPrincipalType
}]
var blobProducerNames = [for grant in producerGrants: grant.name]

// Secret written by infra/deploy.sh (never by this template), read through a Key Vault reference.
var recipientHashKeySecretName = 'recipient-hash-key'

// ---------------------------------------------------------------- resources

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${abbrs.managedIdentityUserAssignedIdentities}${resourceToken}'
  location: location
  tags: tags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    tags: tags
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    retentionInDays: logRetentionInDays
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    tags: tags
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    skuName: storageSkuName
    queueNames: [
      mailQueueName
      poisonQueueName
      priorityQueueName
      priorityPoisonQueueName
    ]
    tableNames: [
      ledgerTableName
      recipientIndexTableName
      governorTableName
      welcomeTableName
      aggregatesTableName
      deliveryTableName
      suppressionTableName
    ]
    containerNames: [
      deploymentContainerName
      claimCheckContainerName
      relayStateContainerName
    ]
    claimCheckContainerName: claimCheckContainerName
    relayStateContainerName: relayStateContainerName
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    location: location
    tags: tags
    name: keyVaultName
    logAnalyticsId: monitoring.outputs.logAnalyticsId
  }
}

module rbac 'modules/rbac.bicep' = {
  name: 'rbac'
  params: {
    identityPrincipalId: identity.properties.principalId
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    mailQueueName: mailQueueName
    priorityQueueName: priorityQueueName
    claimCheckContainerName: claimCheckContainerName
    deployerPrincipalId: deployerPrincipalId
    deployerPrincipalType: deployerPrincipalType
    producers: producerGrants
    producerPrincipalIds: producerPrincipalIds
    producerPrincipalType: producerPrincipalType
    poisonQueueName: poisonQueueName
    operatorPrincipalIds: operatorPrincipalIds
    operatorPrincipalType: operatorPrincipalType
  }
}

// The Entra app-role grants (grantGraphUserReadAll, grantExchangeMailSend, grantGraphMessageTrace) are not deployed here:
// infra/deploy.sh deploys modules/graph.bicep as a second deployment once this one has created the
// identity. In the same deployment Entra has not replicated the new service principal yet and the
// grant fails ("Not a valid reference update", microsoftgraph/msgraph-bicep-types#193).

// The events queue lives in the app's storage account (the app identity's queue role covers it).
resource eventsQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = if (!empty(eventsQueueName)) {
  name: '${abbrs.storageStorageAccounts}${resourceToken}/default/${empty(eventsQueueName) ? 'unused' : eventsQueueName}'
  dependsOn: [
    storage
  ]
}

module events 'modules/events.bicep' = if (enableEventGridTopic) {
  name: 'events'
  params: {
    location: location
    tags: tags
    topicName: '${abbrs.eventGridTopics}${resourceToken}'
    identityPrincipalId: identity.properties.principalId
  }
}

// Every app setting the function app gets, and nothing else (shared/settings.py, scope "app").
var appSettings = {
  // Functions host storage, identity-based (no connection string, shared keys are off).
  AzureWebJobsStorage__accountName: storage.outputs.name
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.properties.clientId
  AZURE_CLIENT_ID: identity.properties.clientId
  // Telemetry, Entra-authenticated.
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identity.properties.clientId}'
  OTEL_EXPORTER_OTLP_ENDPOINT: otelExporterOtlpEndpoint
  // The Python worker hands each invocation the host's trace context and tells the host not to
  // forward the worker's logs as well (the app exports them): no duplicates. Not
  // PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: the worker would configure a second exporter, and
  // without the managed identity (shared/telemetry.py configures the one, Entra-authenticated).
  PYTHON_ENABLE_OPENTELEMETRY: 'true'
  // Storage names.
  MAIL_QUEUE: mailQueueName
  MAIL_QUEUE_PRIORITY: priorityQueueName
  LEDGER_TABLE: ledgerTableName
  RECIPIENT_INDEX_TABLE: recipientIndexTableName
  GOVERNOR_TABLE: governorTableName
  CLAIM_CHECK_CONTAINER: claimCheckContainerName
  RELAY_STATE_CONTAINER: relayStateContainerName
  BLOB_PRODUCERS: join(blobProducerNames, ',')
  // HVE.
  HVE_ACCOUNTS: join(hveAccounts, ',')
  HVE_AUTH: hveAuth
  KEY_VAULT_URL: keyVault.outputs.uri
  HVE_SECRET_CACHE_SECONDS: string(hveSecretCacheSeconds)
  HVE_OAUTH_SCOPE: hveOauthScope
  HVE_SMTP_HOST: hveSmtpHost
  HVE_SMTP_PORT: string(hveSmtpPort)
  HVE_SMTP_TIMEOUT_SECONDS: string(hveSmtpTimeoutSeconds)
  HVE_INTERNAL_DOMAINS: join(hveInternalDomains, ',')
  HVE_SENDER_NAME: hveSenderName
  MAIL_AUTO_SUBMITTED: mailAutoSubmitted ? 'true' : 'false'
  MAIL_SUPPRESS_AUTO_RESPONSES: mailSuppressAutoResponses ? 'true' : 'false'
  HVE_LIMITS_PROFILE: hveLimitsProfile
  HVE_LIMITS: empty(hveLimits) ? '' : string(hveLimits)
  HVE_DAILY_RECIPIENT_BUDGET: hveDailyRecipientBudget > 0 ? string(hveDailyRecipientBudget) : ''
  HVE_DAILY_RESET_UTC: hveDailyResetUtc
  HVE_PACING_MARGIN_SECONDS: string(hvePacingMarginSeconds)
  MAX_RECIPIENTS_PER_REQUEST: string(maxRecipientsPerRequest)
  HVE_POOL_SIZE: string(hvePoolSize)
  HVE_POOL_IDLE_SECONDS: string(hvePoolIdleSeconds)
  HVE_POOL_WAIT_SECONDS: string(hvePoolWaitSeconds)
  HVE_BOOKING_HORIZON_SECONDS: string(hveBookingHorizonSeconds)
  HVE_BOOKINGS_PER_SECOND: string(hveBookingsPerSecond)
  HVE_PACER_SECONDS: string(hvePacerSeconds)
  HVE_SLOT_WAIT_SECONDS: string(hveSlotWaitSeconds)
  HVE_BACKLOG_SAMPLE_SECONDS: string(hveBacklogSampleSeconds)
  HVE_BACKLOG_MIN_MESSAGES: string(hveBacklogMinMessages)
  ACCOUNT_UNHEALTHY_SECONDS: string(accountUnhealthySeconds)
  ACCOUNT_COOLDOWN_SECONDS: string(accountCooldownSeconds)
  SEND_MAX_ATTEMPTS: string(sendMaxAttempts)
  SEND_MAX_AGE_HOURS: string(sendMaxAgeHours)
  RETRY_BASE_SECONDS: string(retryBaseSeconds)
  RETRY_MAX_SECONDS: string(retryMaxSeconds)
  // Retention.
  LEDGER_RETENTION_DAYS: string(ledgerRetentionDays)
  RETENTION_SCHEDULE: retentionSchedule
  RETENTION_MAX_ROWS_PER_RUN: string(retentionMaxRowsPerRun)
  LOST_IN_FLIGHT_HOURS: string(lostInFlightHours)
  SENDING_LEASE_SECONDS: string(sendingLeaseSeconds)
  MAX_ATTACHMENTS: string(maxAttachments)
  // Report and aggregates.
  AGGREGATES_TABLE: aggregatesTableName
  AGGREGATES_FLUSH_SECONDS: string(aggregatesFlushSeconds)
  AGGREGATES_SHARDS: string(aggregatesShards)
  AGGREGATES_ROLLUP_AFTER_MINUTES: string(aggregatesRollupAfterMinutes)
  AGGREGATES_MAX_BUFFER_SECONDS: string(aggregatesMaxBufferSeconds)
  AGGREGATES_MAX_CATEGORIES: string(aggregatesMaxCategories)
  HVE_PRICE_PER_MILLION_RECIPIENTS: hvePricePerMillionRecipients
  REPORT_MAX_DAYS: string(reportMaxDays)
  // HTTP intake (POST /api/send).
  HTTP_SEND_MAX_BYTES: string(httpSendMaxBytes)
  // Read by the Functions host, not the code: bodies beyond this are refused (413) before they are read
  // whole. A little over HTTP_SEND_MAX_BYTES, so the app's own 413 (JSON, with the reason) answers first.
  FUNCTIONS_REQUEST_BODY_SIZE_LIMIT: string(httpSendMaxBytes + 65536)
  RECIPIENT_HASH_KEY: '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=${recipientHashKeySecretName})'
  // Suppression list (keyed hashes, never addresses).
  SUPPRESSION_ENABLED: suppressionEnabled ? 'true' : 'false'
  SUPPRESSION_DAYS: string(suppressionDays)
  SUPPRESSION_TABLE: suppressionTableName
  SUPPRESSION_CACHE_SECONDS: '60'
  // Welcome scan.
  WELCOME_ENABLED: welcomeEnabled ? 'true' : 'false'
  WELCOME_SCHEDULE: welcomeSchedule
  WELCOME_LOOKBACK: welcomeLookback
  WELCOME_GROUP_ID: welcomeGroupId
  WELCOME_BCC: welcomeBcc
  WELCOME_OVERLAP: welcomeOverlap
  WELCOME_PENDING_DAYS: string(welcomePendingDays)
  WELCOME_STATE_TABLE: welcomeTableName
  WELCOME_TEMPLATES: welcomeTemplates
  WELCOME_OUTLOOK_URL: welcomeOutlookUrl
  WELCOME_FAQ_URL: welcomeFaqUrl
  WELCOME_SUPPORT_ADDRESS: welcomeSupportAddress
  GRAPH_BASE_URL: graphBaseUrl
  // Delivery confirmation (message trace).
  DELIVERY_TRACE_ENABLED: deliveryTraceEnabled ? 'true' : 'false'
  DELIVERY_TRACE_SCHEDULE: deliveryTraceSchedule
  DELIVERY_TRACE_MAX_AGE: deliveryTraceMaxAge
  DELIVERY_TRACE_REQUESTS_PER_5MIN: string(deliveryTraceRequestsPer5Min)
  DELIVERY_TRACE_OVERLAP: 'PT30M'
  DELIVERY_TRACE_SPAN: 'PT6H'
  DELIVERY_TRACE_END_LAG: 'PT1M'
  DELIVERY_TRACE_PAGE_SIZE: '5000'
  DELIVERY_TRACE_DETAILS_PER_RUN: '10'
  DELIVERY_TRACE_RETRY_AFTER_MAX: 'PT1H'
  DELIVERY_TABLE: deliveryTableName
  // Outcome events (shared/events.py).
  EVENTS_QUEUE: eventsQueueName
  EVENTS_TOPIC_ENDPOINT: enableEventGridTopic ? events.outputs.endpoint : ''
  EVENTS_SOURCE: eventsSource
}

// A disabled feature costs nothing: its timer function is disabled (AzureWebJobs.<function>.Disabled),
// so Flex Consumption does not start an instance on every tick only for the code to return.
// One line per timer function of function_app.py that a feature flag gates ('true' = disabled).
var timerSettings = {
  'AzureWebJobs.welcome_new_users.Disabled': welcomeEnabled ? 'false' : 'true'
  'AzureWebJobs.confirm_delivery.Disabled': deliveryTraceEnabled ? 'false' : 'true'
  'AzureWebJobs.sample_health.Disabled': enableAlerts ? 'false' : 'true'
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    location: location
    tags: tags
    planName: '${abbrs.webServerFarms}${resourceToken}'
    appName: functionAppName
    identityId: identity.id
    storageBlobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: deploymentContainerName
    pythonVersion: '3.11'
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    zoneRedundant: zoneRedundant
    appSettings: union(appSettings, timerSettings)
    allowedClientIpRanges: allowedClientIpRanges
  }
  dependsOn: [
    rbac
  ]
}

// ---------------------------------------------------------------- alerts (modules/alerts.bicep, docs/alerts.md)

@description('Deploy the alert rules (modules/alerts.bicep, docs/alerts.md) and turn on the sample_health timer they read.')
param enableAlerts bool = false

@description('Address the alerts\' action group e-mails; empty: they fire in the portal only.')
param alertEmail string = ''

@description('Alert when the oldest visible message on the mail queue is older than this many minutes.')
@minValue(5)
param alertOldestMessageMinutes int = 30

module alerts 'modules/alerts.bicep' = if (enableAlerts) {
  name: 'alerts'
  params: {
    location: location
    tags: tags
    resourceToken: resourceToken
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    alertEmail: alertEmail
    mailQueueName: mailQueueName
    poisonQueueName: poisonQueueName
    oldestMessageMinutes: alertOldestMessageMinutes
    deliveryTraceEnabled: deliveryTraceEnabled
  }
}

// ---------------------------------------------------------------- outputs (env style)

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = subscription().tenantId
output AZURE_RESOURCE_GROUP string = resourceGroup().name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_URL string = 'https://${functionApp.outputs.defaultHostName}'
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_URL string = keyVault.outputs.uri
output AZURE_MANAGED_IDENTITY_NAME string = identity.name
output AZURE_MANAGED_IDENTITY_CLIENT_ID string = identity.properties.clientId
output AZURE_MANAGED_IDENTITY_PRINCIPAL_ID string = identity.properties.principalId
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output MAIL_QUEUE string = mailQueueName
output MAIL_QUEUE_URL string = '${storage.outputs.queueEndpoint}${mailQueueName}'
output MAIL_QUEUE_PRIORITY string = priorityQueueName
output HVE_ACCOUNTS string = join(hveAccounts, ',')
output HVE_AUTH string = hveAuth
output HVE_INTERNAL_DOMAINS string = join(hveInternalDomains, ',')
output RECIPIENT_HASH_KEY_SECRET_NAME string = recipientHashKeySecretName
// Grants infra/deploy.sh makes in its second deployment (modules/graph.bicep).
output GRAPH_USER_READ_ALL_GRANTED bool = grantGraphUserReadAll
output EXCHANGE_MAIL_SEND_GRANTED bool = grantExchangeMailSend
output GRAPH_MESSAGE_TRACE_GRANTED bool = grantGraphMessageTrace
output WELCOME_ENABLED bool = welcomeEnabled
output DELIVERY_TRACE_ENABLED bool = deliveryTraceEnabled
output EVENTS_QUEUE string = eventsQueueName
output EVENTS_TOPIC_NAME string = enableEventGridTopic ? events.outputs.name : ''

